"""aloe mix: token-balanced mixtures, through the core API and the real CLI."""

from __future__ import annotations

import gzip
import io
import json
import random
from collections import Counter

import numpy as np
import pytest

from aloe_cli.errors import AloeError
from aloe_cli.mixing import CELLS, MixOptions, build_report, make_plan, recipe_from_dict, run_mix, water_fill
from aloe_cli.mixing.plan import Group
from aloe_cli.modeling.loss_tokens import load_counter
from support import aloe, chat, read_jsonl, scan, write_jsonl

WORDS = ("the liver shows a small nodule with mild edema and no acute abnormality in the chest "
         "lung heart brain kidney spine normal lesion fracture mass effusion").split()
TARGETS = {"medical/multimodal": 0.4, "medical/text": 0.2, "general/multimodal": 0.25, "general/text": 0.15}
# (file, domain, multimodal, records, answer words): answer lengths differ ~30x between sources
SOURCES = [
    ("vqa-short", "medical", True, 240, (1, 3)),
    ("report-long", "medical", True, 60, (40, 70)),
    ("med-qa", "medical", False, 120, (20, 40)),
    ("general-vqa", "general", True, 200, (2, 6)),
    ("general-essay", "general", False, 90, (50, 90)),
]


def sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def make_sources(folder, sources=SOURCES, seed=0):
    rng = random.Random(seed)
    paths = {}
    (folder / "img").mkdir(exist_ok=True)
    image = io.BytesIO()
    scan(0, size=96).save(image, format="PNG")  # mix checks that every image exists and has a readable header
    for name, domain, multimodal, count, (low, high) in sources:
        records = [chat(sentence(rng, 4, 10), sentence(rng, low, high), [f"img/{name}-{i}.png"] if multimodal else [],
                        id=f"{name}-{i}", source=name, domain=domain) for i in range(count)]
        for record in records:
            for entry in record["images"]:
                (folder / entry).write_bytes(image.getvalue())
        paths[name] = write_jsonl(folder / f"{name}.jsonl", records)
    return paths


def recipe_for(paths, sources=SOURCES, targets=TARGETS, per_source=None, **top):
    """A recipe over `sources`; `per_source` adds keys (weight, max_repeats, ...) to named sources."""
    entries = [{"name": name, "paths": str(paths[name]), "domain": domain, **(per_source or {}).get(name, {})}
               for name, domain, *_ in sources]
    return recipe_from_dict({"tokenizer": "unused", "targets": targets, "sources": entries, **top})


@pytest.fixture(scope="module")
def counter(tiny_model_dir):
    return load_counter(str(tiny_model_dir))


def mix(recipe, counter, tmp_path, name="out.jsonl", **options):
    output = tmp_path / name
    result = run_mix(recipe, MixOptions(output=str(output), cache=False, **options), counter=counter)
    return build_report(result), (read_jsonl(output) if output.exists() else [])


def token_shares(records):
    per_cell = Counter()
    for record in records:
        per_cell[record["aloe"]["mix"]["cell"]] += record["aloe"]["mix"]["loss_tokens"]
    total = sum(per_cell.values())
    return {cell: per_cell[cell] / total for cell in CELLS}


# ----------------------------------------------------------------------------- shares

def test_token_shares_hit_targets_and_a_count_balanced_mix_misses_them(tmp_path, counter):
    paths = make_sources(tmp_path)
    report, records = mix(recipe_for(paths), counter, tmp_path)
    before = {cell: report["cells"][cell]["share_before"] for cell in CELLS}
    assert max(abs(before[c] - TARGETS[c]) for c in CELLS) > 0.1  # the raw data is far from the targets
    shares = token_shares(records)  # measured on the written records, not on the plan
    for cell in CELLS:
        assert shares[cell] == pytest.approx(TARGETS[cell], abs=0.01), cell
        assert report["cells"][cell]["share_after"] == pytest.approx(shares[cell], abs=1e-6)

    by_count, counted = mix(recipe_for(paths, balance="samples"), counter, tmp_path, "by_count.jsonl")
    sample_shares = Counter(r["aloe"]["mix"]["cell"] for r in counted)
    for cell in CELLS:  # it does balance what it balances: sample counts...
        assert sample_shares[cell] / len(counted) == pytest.approx(TARGETS[cell], abs=0.01)
    missed = token_shares(counted)  # ...but the loss sees tokens, and those are far off
    assert max(abs(missed[c] - TARGETS[c]) for c in CELLS) > 0.08


def test_sources_share_their_cell_by_weight(tmp_path, counter):
    paths = make_sources(tmp_path)
    recipe = recipe_for(paths, per_source={"report-long": {"weight": 3}}, total_tokens=6000)
    report, records = mix(recipe, counter, tmp_path)
    assert report["notes"] == []  # both sources can supply their part
    tokens = Counter()
    for record in records:
        if record["aloe"]["mix"]["cell"] == "medical/multimodal":
            tokens[record["aloe"]["mix"]["source"]] += record["aloe"]["mix"]["loss_tokens"]
    assert tokens["report-long"] / tokens["vqa-short"] == pytest.approx(3.0, rel=0.05)


def test_output_is_shuffled_and_deterministic_for_a_seed(tmp_path, counter):
    paths = make_sources(tmp_path)
    mix(recipe_for(paths, seed=7), counter, tmp_path, "a.jsonl")
    mix(recipe_for(paths, seed=7), counter, tmp_path, "b.jsonl")
    mix(recipe_for(paths, seed=8), counter, tmp_path, "c.jsonl")
    a, b, c = ((tmp_path / n).read_bytes() for n in ("a.jsonl", "b.jsonl", "c.jsonl"))
    assert a == b
    assert a != c
    sources = [r["source"] for r in read_jsonl(tmp_path / "a.jsonl")]
    runs = sum(1 for x, y in zip(sources, sources[1:]) if x != y)
    assert runs > len(sources) / 3  # interleaved, not one source after another


def test_max_repeats_caps_up_sampling(tmp_path, counter):
    paths = make_sources(tmp_path)
    # Ask for more tokens than there are: only med-qa may be repeated (3x), the rest is used once.
    available = mix(recipe_for(paths), counter, tmp_path, dry_run=True)[0]["tokens_available"]
    recipe = recipe_for(paths, per_source={"med-qa": {"max_repeats": 3}}, total_tokens=3 * available)
    report, records = mix(recipe, counter, tmp_path)
    copies = Counter(r["id"] for r in records if r["source"] == "med-qa")
    assert set(copies.values()) == {3}
    assert {r["aloe"]["mix"]["copy"] for r in records if r["source"] == "med-qa"} == {0, 1, 2}
    others = Counter(r["id"] for r in records if r["source"] != "med-qa")
    assert set(others.values()) == {1}  # max_repeats defaults to 1: never repeated
    assert report["cells"]["medical/text"]["repeat_factor"] == pytest.approx(3.0)
    assert any(note.startswith(f"total_tokens {3 * available:,} is out of reach") for note in report["notes"])


def test_an_unfillable_cell_is_reported_and_the_rest_rebalanced(tmp_path, counter):
    sources = [s for s in SOURCES if s[0] != "general-essay"]  # no general text at all
    paths = make_sources(tmp_path, sources)
    report, records = mix(recipe_for(paths, sources), counter, tmp_path)
    notes = [n for n in report["notes"] if n.startswith("general/text")]
    assert len(notes) == 1 and "15.0% target" in notes[0] and "short by" in notes[0]
    shares = token_shares(records)
    assert shares["general/text"] == 0
    # The others keep their proportions to each other: 0.4 : 0.2 : 0.25 over 0.85.
    for cell in ("medical/multimodal", "medical/text", "general/multimodal"):
        assert shares[cell] == pytest.approx(TARGETS[cell] / 0.85, abs=0.01)


def test_total_samples_is_met(tmp_path, counter):
    paths = make_sources(tmp_path)
    report, records = mix(recipe_for(paths, total_samples=300), counter, tmp_path)
    assert len(records) == report["samples"] == report["written"]
    assert abs(len(records) - 300) <= 6
    for cell in CELLS:
        assert token_shares(records)[cell] == pytest.approx(TARGETS[cell], abs=0.015)


def test_every_record_is_accounted_for_and_bad_ones_go_to_rejects(tmp_path, counter):
    paths = make_sources(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{broken\n" + json.dumps({"messages": [{"role": "user", "content": "no answer"}],
                                              "source": "med-qa"}) + "\n")
    recipe = recipe_for({**paths, "bad": bad}, SOURCES + [("bad", "medical", False, 0, (1, 1))])
    rejects = tmp_path / "rejects.jsonl"
    report, records = mix(recipe, counter, tmp_path, rejects=str(rejects), on_error="skip")
    assert report["read"] == sum(s[3] for s in SOURCES) + 2
    assert report["rejected"] == 2 and report["reasons"] == {"invalid_json": 1, "no_loss_tokens": 1}
    assert report["read"] == report["rejected"] + report["available"]
    assert report["kept"] == report["available"]  # the reading pass keeps what the plan may choose from
    assert report["inputs"][str(bad)] == {"read": 2, "kept": 0, "rejected": 2}
    assert report["inputs"][str(paths["med-qa"])] == {"read": 120, "kept": 120, "rejected": 0}
    assert report["available"] == report["selected_unique"] + report["not_selected"]
    rejected = read_jsonl(rejects)
    assert [r["aloe"]["reject"]["stage"] for r in rejected] == ["mix", "mix"]
    assert rejected[1]["aloe"]["reject"]["reason"] == "no_loss_tokens"
    assert len({r["id"] for r in records}) == report["selected_unique"]


def test_loss_tokens_are_written_and_match_the_counter(tmp_path, counter):
    paths = make_sources(tmp_path, SOURCES[:2])
    _, records = mix(recipe_for(paths, SOURCES[:2], {"medical/multimodal": 1.0}), counter, tmp_path)
    messages = [r["messages"] for r in records]
    assert [r["aloe"]["mix"]["loss_tokens"] for r in records] == counter.count(messages)


def test_region_annotations_become_grounding_text(tmp_path, counter):
    (tmp_path / "img").mkdir()
    scan(1, size=200).save(tmp_path / "img" / "a.png")
    record = chat("Where is the nodule?", "", ["img/a.png"], id="g1", domain="medical",
                  objects=[{"bbox": [20, 40, 100, 140], "label": "nodule"}])
    path = write_jsonl(tmp_path / "ground.jsonl", [record])
    recipe = recipe_from_dict({"tokenizer": "unused", "targets": {"medical/multimodal": 1},
                               "sources": [{"name": "g", "paths": str(path), "domain": "medical"}]})
    _, records = mix(recipe, counter, tmp_path)
    answer = records[0]["messages"][-1]["content"][0]["text"]
    assert answer == "<|object_ref_start|>nodule<|object_ref_end|><|box_start|>(100,200),(500,700)<|box_end|>"
    assert records[0]["aloe"]["grounding"]["boxes"] == 1
    assert records[0]["aloe"]["mix"]["loss_tokens"] == counter.count([records[0]["messages"]])[0]


@pytest.mark.parametrize("how", ["recipe", "cli", "upstream"])
def test_the_bbox_format_reaches_the_reader(tmp_path, counter, tiny_model_dir, how):
    (tmp_path / "img").mkdir()
    scan(1, size=200).save(tmp_path / "img" / "a.png")
    record = chat("Where is the nodule?", "", ["img/a.png"], id="g1", domain="medical",
                  objects=[{"bbox": [20, 40, 80, 100], "label": "nodule"}])  # x, y, w, h
    path = write_jsonl(tmp_path / "ground.jsonl", [record])
    if how == "recipe":
        recipe = recipe_from_dict({"tokenizer": "unused", "targets": {"medical/multimodal": 1}, "sources": [
            {"name": "g", "paths": str(path), "domain": "medical", "bbox_format": "xywh"}]})
        records = mix(recipe, counter, tmp_path)[1]
    else:
        mix_args = ["mix", "--tokenizer", str(tiny_model_dir), "--share", "medical/multimodal=1", "--no-cache"]
        if how == "cli":
            proc = aloe(*mix_args, "-i", str(path), "--bbox-format", "xywh")
        else:  # grounded by the first command of a pipe; mix keeps the text (its own default is xyxy)
            first = aloe("dedup", "-i", str(path), "--within", "--bbox-format", "xywh")
            assert first.returncode == 0, first.stderr
            proc = aloe(*mix_args, stdin=first.stdout, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        records = read_jsonl(proc.stdout)
    assert [r["id"] for r in records] == ["g1"]
    answer = records[0]["messages"][-1]["content"][0]["text"]
    assert answer == "<|object_ref_start|>nodule<|object_ref_end|><|box_start|>(100,200),(500,700)<|box_end|>"
    assert records[0]["aloe"]["grounding"]["bbox_format"] == "xywh"


def test_dry_run_writes_nothing(tmp_path, counter):
    paths = make_sources(tmp_path, SOURCES[:1])
    report, records = mix(recipe_for(paths, SOURCES[:1], {"medical/multimodal": 1.0}), counter, tmp_path,
                          dry_run=True)
    assert records == [] and not (tmp_path / "out.jsonl").exists()
    assert report["dry_run"] and report["written"] == 0 and report["samples"] == SOURCES[0][3]


# ----------------------------------------------------------------------------- planning math

def test_water_fill_respects_caps_and_proportions():
    alloc = water_fill(100, np.array([1.0, 1.0, 2.0]), np.array([10.0, 1000.0, 1000.0]))
    assert alloc.sum() == pytest.approx(100)
    assert alloc[0] == pytest.approx(10) and alloc[2] == pytest.approx(2 * alloc[1])
    assert water_fill(1e9, np.array([1.0, 1.0]), np.array([3.0, 4.0])).tolist() == [3.0, 4.0]


def test_plan_never_repeats_beyond_max_repeats():
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, 1000)
    group_of = np.repeat([0, 1], 500)
    groups = [Group("a", "medical/text", max_repeats=2.5), Group("b", "general/text")]
    plan = make_plan(group_of, tokens, groups, {"medical/text": 0.9, "general/text": 0.1}, total_tokens=10 ** 7)
    assert plan.copies[:500].max() == 3 and plan.copies[500:].max() == 1
    assert plan.group_tallies[0].repeat_factor == pytest.approx(2.5, abs=0.02)


def test_plan_works_in_chunks_without_changing_the_choice(monkeypatch):
    from aloe_cli.mixing import plan as plan_module

    rng = np.random.default_rng(1)
    assert (plan_module.permutation(1000, np.random.default_rng(5)) == np.random.default_rng(5).permutation(1000)).all()
    group_of = rng.integers(-1, 3, 5000).astype(np.int32)
    tokens = rng.integers(1, 300, 5000).astype(np.uint32)
    groups = [Group("a", "medical/text", max_repeats=2), Group("b", "general/text"), Group("c", "general/text")]
    targets = {"medical/text": 0.7, "general/text": 0.3}
    whole = make_plan(group_of, tokens, groups, targets, seed=3, total_tokens=400_000)
    monkeypatch.setattr(plan_module, "_CHUNK", 7)  # many chunks, boundaries everywhere
    chunked = make_plan(group_of, tokens, groups, targets, seed=3, total_tokens=400_000)
    assert (whole.copies == chunked.copies).all() and whole.copies.max() == 2
    assert [vars(t) for t in whole.group_tallies] == [vars(t) for t in chunked.group_tallies]
    for g in range(3):  # the sums the plan works from
        rows = group_of == g
        tally = whole.group_tallies[g]
        assert (tally.samples_available, tally.tokens_available) == (rows.sum(), tokens[rows].sum())
        assert tally.tokens_selected == int((whole.copies[rows].astype(np.int64) * tokens[rows]).sum())


# ----------------------------------------------------------------------------- the CLI

def write_recipe(folder, body: str):
    path = folder / "recipe.yaml"
    path.write_text(body)
    return path


GOOD_RECIPE = """\
tokenizer: {tokenizer}
seed: 1
targets:
  medical/multimodal: 0.5
  medical/text: 0.2
  general/multimodal: 0.2
  general/text: 0.1
sources:
  - name: vqa-short
    paths: vqa-short.jsonl
    domain: medical
  - name: reports
    paths: "report-*.jsonl"
    domain: medical
  - name: med-qa
    paths: [med-qa.jsonl]
    domain: medical
  - name: general
    paths: ["general-vqa.jsonl", "general-essay.jsonl"]
    domain: general
"""


def test_cli_recipe_dry_run_report_plot_and_a_cache_that_survives_a_changed_recipe(tmp_path, tiny_model_dir):
    make_sources(tmp_path)
    cache = tmp_path / "tokens.sqlite"
    recipe = write_recipe(tmp_path, GOOD_RECIPE.format(tokenizer=tiny_model_dir))
    proc = aloe("mix", "--recipe", str(recipe), "--dry-run", "--report", str(tmp_path / "r1.json"),
                "--plot", str(tmp_path / "plots"), "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert "medical/multimodal" in proc.stderr and "dry run" in proc.stderr
    first = json.loads((tmp_path / "r1.json").read_text())
    total = sum(s[3] for s in SOURCES)
    assert first["read"] == total and first["token_cache"]["misses"] == total
    assert first["cells"]["general/text"]["share_after"] == pytest.approx(0.1, abs=0.01)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["mix_cells.png", "mix_sources.png"]

    changed = write_recipe(tmp_path, GOOD_RECIPE.format(tokenizer=tiny_model_dir).replace("0.5", "0.6")
                           .replace("general/text: 0.1", "general/text: 0.0"))
    output = tmp_path / "mixture.jsonl.gz"
    proc = aloe("mix", "--recipe", str(changed), "-o", str(output), "--report", str(tmp_path / "r2.json"),
                "--cache", str(cache))
    assert proc.returncode == 0, proc.stderr
    second = json.loads((tmp_path / "r2.json").read_text())
    assert second["token_cache"] == {"path": str(cache), "hits": total, "misses": 0}  # nothing re-tokenized
    assert second["counting"]["records_counted"] == 0
    written = read_jsonl(gzip.decompress(output.read_bytes()).decode())
    assert len(written) == second["written"] == second["samples"]
    assert token_shares(written)["medical/multimodal"] == pytest.approx(0.6, abs=0.01)


def test_cli_pipe(tmp_path, tiny_model_dir):
    paths = make_sources(tmp_path, SOURCES[3:])
    text = "".join(p.read_text() for p in paths.values())
    proc = aloe("mix", "--tokenizer", str(tiny_model_dir), "--share", "general/multimodal=0.7",
                "--share", "general/text=0.3", "--no-cache", stdin=text, cwd=tmp_path)  # stdin's images: cwd
    assert proc.returncode == 0, proc.stderr
    records = read_jsonl(proc.stdout)
    assert records and {r["source"] for r in records} == {"general-vqa", "general-essay"}
    # Records are whole: with ~10 essays of ~80 loss tokens selected, a share is exact to within one of them.
    one_record = max(r["aloe"]["mix"]["loss_tokens"] for r in records) / sum(r["aloe"]["mix"]["loss_tokens"]
                                                                            for r in records)
    assert token_shares(records)["general/multimodal"] == pytest.approx(0.7, abs=one_record)
    assert "aloe mix" in proc.stderr and "{" not in proc.stderr.splitlines()[0]
    total = sum(s[3] for s in SOURCES[3:])
    assert f"{total} read = {total} kept + 0 rejected" in proc.stderr  # the runner's closing line


# Runs the CLI like `python -m aloe_cli`, then says which heavy modules the process ended up importing.
HEAVY_IMPORTS_PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("heavy imports: %s\\n" % sorted(
    {name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "torchvision", "accelerate"})))
sys.argv[0] = "aloe"
from aloe_cli.app import main
main()
"""


def test_cli_mix_imports_neither_torch_nor_transformers(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    paths = make_sources(tmp_path, SOURCES[:3])
    output = tmp_path / "mixture.jsonl"
    proc = subprocess.run([sys.executable, "-c", HEAVY_IMPORTS_PROBE, "mix", "-i", str(paths["vqa-short"]),
                           "-i", str(paths["med-qa"]), "--tokenizer", str(tiny_model_dir), "--share",
                           "medical/multimodal=0.5", "--share", "medical/text=0.5", "--cache",
                           str(tmp_path / "c.sqlite"), "-o", str(output)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert read_jsonl(output) and proc.stderr.strip().splitlines()[-1] == "heavy imports: []", proc.stderr


def test_cli_bad_record_fails_with_file_and_line(tmp_path, tiny_model_dir):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(chat("q", "a", domain="medical")) + "\n{oops\n")
    proc = aloe("mix", "-i", str(path), "--tokenizer", str(tiny_model_dir), "--share", "medical/text=1",
                "--no-cache")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"aloe: error: {path}:2: invalid JSON"), proc.stderr


ONE_SOURCE = "sources: [{name: a, paths: a.jsonl, domain: medical}]\n"
BAD_RECIPES = {
    "missing_key": ("seed: 1\ntargets: {medical/text: 1}\n" + ONE_SOURCE, "tokenizer: missing"),
    "not_summing": ("tokenizer: t\ntargets: {medical/text: 0.5, general/text: 0.4}\n" + ONE_SOURCE,
                    "targets: shares must sum to 1, got 0.9"),
    "unknown_cell": ("tokenizer: t\ntargets: {medical/video: 1}\n" + ONE_SOURCE, "targets.medical/video: unknown cell"),
    "bad_glob": ("tokenizer: t\ntargets: {medical/text: 1}\nsources: [{name: a, paths: 'nothing/*.jsonl', "
                 "domain: medical}]\n", "sources[0] (a).paths: 'nothing/*.jsonl' matches no file"),
    "missing_file": ("tokenizer: t\ntargets: {medical/text: 1}\n" + ONE_SOURCE.replace("a.jsonl", "b.jsonl"),
                     "sources[0] (a).paths: 'b.jsonl' not found"),
    "bad_domain": ("tokenizer: t\ntargets: {medical/text: 1}\nsources: [{name: a, paths: a.jsonl, domain: medicine}]\n",
                   "sources[0] (a).domain: must be 'medical' or 'general', got 'medicine'"),
    "source_key_missing": ("tokenizer: t\ntargets: {medical/text: 1}\nsources: [{name: a, domain: medical}]\n",
                           "sources[0].paths: missing"),
    "typo": ("tokenizer: t\ntarget: {medical/text: 1}\nsources: [{name: a, paths: a.jsonl, domain: medical}]\n",
             "target: unknown key"),
    "bad_repeats": ("tokenizer: t\ntargets: {medical/text: 1}\nsources: [{name: a, paths: a.jsonl, domain: medical, "
                    "max_repeats: 0}]\n", "sources[0] (a).max_repeats: must be a number from 1"),
    "both_sizes": ("tokenizer: t\ntotal_samples: 10\ntotal_tokens: 10\ntargets: {medical/text: 1}\n"
                   "sources: [{name: a, paths: a.jsonl, domain: medical}]\n", "give total_samples or total_tokens"),
    "yaml": ("tokenizer: t\ntargets: {medical/text: 1\n", "not valid YAML (line"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_cli_bad_recipes_give_one_line_naming_the_key(tmp_path, case):
    body, expected = BAD_RECIPES[case]
    write_jsonl(tmp_path / "a.jsonl", [chat("q", "a")])
    recipe = write_recipe(tmp_path, body)
    proc = aloe("mix", "--recipe", str(recipe), "--dry-run", "--no-cache")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"aloe: error: {recipe}: "), proc.stderr
    assert expected in lines[0]


@pytest.mark.parametrize("args, expected", [
    (["--share", "medical/multimodal=0.4"], "shares must sum to 1"),
    (["--share", "medical/video=1"], "unknown cell 'medical/video'"),
    (["--share", "medical/text"], "expected CELL=SHARE"),
    ([], "give --recipe FILE"),
])
def test_cli_bad_inline_options_are_usage_errors(tmp_path, args, expected):
    path = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a")])
    proc = aloe("mix", "-i", str(path), "--tokenizer", "unused", *args)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("aloe: error:")]
    assert len(errors) == 1 and expected in errors[0] and "--" in errors[0], proc.stderr


def test_missing_tokenizer_is_one_line(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a", domain="medical")])
    proc = aloe("mix", "-i", str(path), "--tokenizer", str(tmp_path / "nope"), "--share", "medical/text=1",
                "--no-cache")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("aloe: error: cannot load tokenizer"), proc.stderr


def test_records_without_a_domain_need_one_in_the_inline_form(tmp_path, counter):
    from aloe_cli.mixing import inline_recipe

    path = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a")])
    recipe = inline_recipe([str(path)], ["medical/text=1"], tokenizer="unused")
    with pytest.raises(AloeError, match="field 'domain': has no domain"):
        run_mix(recipe, MixOptions(output=str(tmp_path / "o.jsonl"), cache=False), counter=counter)
    recipe = inline_recipe([str(path)], ["medical/text=1"], tokenizer="unused", domain="medical")
    result = run_mix(recipe, MixOptions(output=str(tmp_path / "o.jsonl"), cache=False), counter=counter)
    assert result.written == 1
    assert [(g.source, g.cell) for g in result.plan.groups] == [("a", "medical/text")]
