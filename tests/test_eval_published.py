"""The published benchmarks by name (evaluation.registry) and the VLMEvalKit-shaped tables: the main table
in the published order under both protocols, the per-split / per-category breakdowns (results.md and
`<model>/<benchmark>/acc.csv`), and the adversarial table's published columns."""

from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
from eval_fixtures import mcq_tsv, paired_jsonl, png_base64, write_tsv
from fake_openai_server import FakeOpenAIServer

from aloe_cli.errors import AloeError, UsageError
from aloe_cli.evaluation import registry, vlmevalkit
from aloe_cli.evaluation.benchmarks import parse_benchmark_spec, read_benchmark
from aloe_cli.evaluation.results import (
    collect_scores,
    parse_robustness_columns,
    render_acc_csv,
    render_csv,
    render_markdown,
    robustness_columns,
    write_tables,
)
from support import aloe, scan

PUBLISHED_ORDER = ["PathMMU", "GMAI-MMBench", "OmniMedVQA", "ProbMed", "SLAKE", "MMMU", "MultiMedQA", "MMLU"]

# ----------------------------------------------------------------------------- the registry


def test_the_registry_holds_the_published_benchmarks_in_the_published_order():
    assert [entry.name for entry in registry.PUBLISHED] == PUBLISHED_ORDER
    lm_eval = {entry.name: entry.lm_eval_task for entry in registry.PUBLISHED if entry.lm_eval_task}
    assert lm_eval == {"MultiMedQA": "multimedqa", "MMLU": "mmlu"}
    assert all(entry.obtain and entry.prompt and entry.metric for entry in registry.PUBLISHED)
    # every VLMEvalKit dataset named here is one the vlmevalkit protocol knows: its prompt is Qwen2-VL's mixin
    datasets = {name for entry in registry.PUBLISHED for name in (*entry.datasets, entry.stem_dataset) if name}
    assert datasets == {"PathMMU_TEST", "PathMMU_VAL", "GMAI-MMBench_VAL", "GMAI-MMBench_TEST", "OmniMedVQA",
                        "MMMU_DEV_VAL", "MMMU_TEST"}
    assert all(vlmevalkit.dataset_type(name) == "MCQ" and vlmevalkit.uses_mixin_prompt(name) for name in datasets)


@pytest.mark.parametrize(("argument", "name", "published", "dataset"), [
    ("PathMMU_VAL.tsv", "PathMMU_VAL", "PathMMU", "PathMMU_VAL"),  # a VLMEvalKit file by its own name
    ("pathmmu_test.tsv", "pathmmu_test", "PathMMU", "PathMMU_TEST"),  # stems in any case
    ("PathMMU=mine.tsv", "PathMMU", "PathMMU", "PathMMU_TEST"),  # by name: VLMEvalKit's default file
    ("gmai=mine.tsv", "gmai", "GMAI-MMBench", "GMAI-MMBench_VAL"),  # by alias, any case
    ("GMAI_mm_bench_TEST_part_3.tsv", "GMAI_mm_bench_TEST_part_3", "GMAI-MMBench", "GMAI-MMBench_TEST"),
    ("omnimedbench_part_2_local.tsv", "omnimedbench_part_2_local", "OmniMedVQA", "OmniMedVQA"),
    ("mine=MMMU_DEV_VAL.tsv", "mine", "MMMU", "MMMU_DEV_VAL"),  # an unknown name, a known file: the file says
    ("probmed.jsonl", "probmed", "ProbMed", None),  # not in VLMEvalKit
    ("SLAKE=mine.jsonl", "SLAKE", "SLAKE", None),
])
def test_a_published_benchmark_is_recognised_by_name_alias_or_file_stem(tmp_path, argument, name, published,
                                                                        dataset):
    stem, _, file = argument.rpartition("=")
    path = tmp_path / file
    mcq_tsv(path, count=2) if file.endswith(".tsv") else paired_jsonl(path, pairs=1)
    spec = parse_benchmark_spec(f"{stem}={path}" if stem else str(path))
    assert (spec.name, spec.published, spec.vlmevalkit_name) == (name, published, dataset)


def test_a_benchmark_aloe_does_not_know_is_read_as_before(tmp_path):
    mcq_tsv(tmp_path / "chest.tsv", count=3)
    shutil.copy(tmp_path / "chest.tsv", tmp_path / "PathMMU_VAL.tsv")
    unknown = parse_benchmark_spec(str(tmp_path / "chest.tsv"))
    known = parse_benchmark_spec(str(tmp_path / "PathMMU_VAL.tsv"))
    assert (unknown.name, unknown.published, unknown.vlmevalkit_name) == ("chest", None, None)
    items = [item.annotations["eval_item"] for item in read_benchmark(unknown)]
    same = [item.annotations["eval_item"] for item in read_benchmark(known)]
    assert [item.fields() | {"benchmark": None} for item in items] == [
        item.fields() | {"benchmark": None} for item in same]
    assert registry.recognise("chest", "chest.tsv") is None and registry.lookup("MedQA") is None


def test_text_benchmarks_point_at_lm_eval_and_missing_files_say_what_to_get(tmp_path):
    with pytest.raises(UsageError, match="--lm-eval-tasks mmlu"):
        parse_benchmark_spec("MMLU")
    with pytest.raises(UsageError, match="--lm-eval-tasks multimedqa"):
        parse_benchmark_spec("multimedqa")
    with pytest.raises(AloeError, match="PathMMU_TEST.tsv"):
        parse_benchmark_spec("PathMMU")
    with pytest.raises(AloeError, match=r"^benchmark file not found: nothing\.tsv$"):
        parse_benchmark_spec("nothing.tsv")


def test_cli_benchmark_mmlu_without_a_file_names_the_lm_eval_task(tmp_path):
    common = ["--model", "m", "--backend", "openai", "--base-url", "http://127.0.0.1:9/v1", "-o", str(tmp_path)]
    mmlu = aloe("eval", "--benchmark", "MMLU", *common)
    assert mmlu.returncode == 2, mmlu.stderr
    assert "MMLU is a text benchmark run by lm-evaluation-harness: use --lm-eval-tasks mmlu" in mmlu.stderr
    pathmmu = aloe("eval", "--benchmark", "pathmmu", *common)
    assert pathmmu.returncode == 1 and "benchmark file not found: pathmmu (PathMMU is read from" in pathmmu.stderr
    assert "Traceback" not in mmlu.stderr + pathmmu.stderr


# ----------------------------------------------------------------------------- tables from scores files


def figures(items, vlmevalkit, aloe_figure):
    return {"items": items, "accuracy": vlmevalkit, "accuracy_aloe": aloe_figure}


def handwritten_scores(folder, model="m1", created=1):
    """A scores.json as an eval run writes it (both protocols, splits, categories, robustness)."""
    benchmarks = {
        "chest": {**figures(4, 50.0, 75.0), "main": 50.0, "main_aloe": 75.0, "unreadable": 1,
                  "splits": {"none": figures(4, 50.0, 75.0)}},
        "MMMU_DEV_VAL": {
            **figures(6, 50.0, 66.67), "main": 50.0, "main_aloe": 66.67, "published": "MMMU",
            "categories": {"Art": figures(3, 33.33, 66.67), "Biology": figures(3, 66.67, 66.67)},
            "l2_categories": {"Art & Design": figures(3, 33.33, 66.67)},
            "splits": {
                "dev": {**figures(2, 50.0, 50.0), "categories": {"Art": figures(2, 50.0, 50.0)},
                        "l2_categories": {"Art & Design": figures(2, 50.0, 50.0)}},
                "validation": {**figures(4, 25.0, 75.0),
                               "categories": {"Art": figures(1, 0.0, 100.0), "Biology": figures(3, 33.33, 66.67)},
                               "l2_categories": {"Art & Design": figures(1, 0.0, 100.0)}}}},
        "PathMMU_VAL": {
            **figures(4, 25.0, 50.0), "main": 25.0, "main_aloe": 50.0, "published": "PathMMU",
            "categories": {"EduContent": figures(2, 50.0, 50.0), "PubMed": figures(2, 0.0, 50.0)},
            "splits": {"none": {**figures(4, 25.0, 50.0), "categories": {
                "EduContent": figures(2, 50.0, 50.0), "PubMed": figures(2, 0.0, 50.0)}}},
            "robustness": {
                "cls": {kind: figures(2, value, 50.0) for kind, value in
                        (("base", 50.0), ("cap", 0.0), ("pmt", 50.0), ("syc", 0.0), ("leg", 0.0))},
                "det": {kind: figures(2, value, 100.0) for kind, value in
                        (("base", 100.0), ("cap", 50.0), ("pmt", 50.0), ("syc", 0.0), ("leg", 50.0),
                         ("region", 0.0))}}},
        "multimedqa": {"items": 100, "accuracy": 61.2, "main": 61.2, "metric": "acc", "source": "lm-eval"},
    }
    path = folder / model / "scores.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "created": created, "benchmarks": benchmarks}))
    for name in ("MMMU_DEV_VAL", "PathMMU_VAL"):
        (folder / model / name).mkdir(exist_ok=True)
    return path


def table(text, heading):
    """The rows of the markdown table under `heading`."""
    lines = text.splitlines()
    start = next(index for index, line in enumerate(lines) if line.startswith(heading))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_main_table_published_order_first_both_protocols(tmp_path):
    handwritten_scores(tmp_path)
    text = render_markdown(collect_scores(tmp_path))
    vlmevalkit = table(text, "## Benchmarks (accuracy, %): VLMEvalKit protocol, comparable with published")
    aloe_rows = table(text, "## Benchmarks (accuracy, %): aloe extraction, not comparable")
    assert vlmevalkit[0] == ["model", "PathMMU_VAL", "MMMU_DEV_VAL", "multimedqa", "chest"]
    # MMMU's figure is its validation split (VLMEvalKit's primary metric); lm-eval has one figure
    assert vlmevalkit[2] == ["m1", "25.0", "25.0", "61.2", "50.0"]
    assert aloe_rows[2] == ["m1", "50.0", "75.0", "61.2", "75.0"]
    rows = list(csv.reader(io.StringIO(render_csv(collect_scores(tmp_path)))))
    assert rows[0][:9] == ["model", "PathMMU_VAL", "MMMU_DEV_VAL", "multimedqa", "chest", "PathMMU_VAL (aloe)",
                           "MMMU_DEV_VAL (aloe)", "multimedqa (aloe)", "chest (aloe)"]
    assert rows[1][:9] == ["m1", "25.0", "25.0", "61.2", "50.0", "50.0", "75.0", "61.2", "75.0"]
    assert rows[0][9:11] == ["cls Base", "cls Cap"] and rows[0][-1] == "det Leg (aloe)"


def test_breakdowns_per_split_and_category_under_both_protocols(tmp_path):
    handwritten_scores(tmp_path)
    write_tables(tmp_path)
    text = (tmp_path / "results.md").read_text()
    mmmu = table(text, "## MMMU_DEV_VAL: accuracy per split and category")
    assert mmmu == [
        ["model", "split", "protocol", "Overall", "Art & Design", "Art", "Biology"],
        ["---", "---", "---", "---:", "---:", "---:", "---:"],
        ["m1", "dev", "VLMEvalKit", "50.0", "50.0", "50.0", "-"],
        ["m1", "validation", "VLMEvalKit", "25.0", "0.0", "0.0", "33.3"],
        ["m1", "dev", "aloe", "50.0", "50.0", "50.0", "-"],
        ["m1", "validation", "aloe", "75.0", "100.0", "100.0", "66.7"]]
    pathmmu = table(text, "## PathMMU_VAL: accuracy per split and category")
    assert pathmmu[2:] == [["m1", "none", "VLMEvalKit", "25.0", "50.0", "0.0"],
                           ["m1", "none", "aloe", "50.0", "50.0", "50.0"]]
    assert "## chest:" not in text  # nothing to break down
    acc = (tmp_path / "m1" / "MMMU_DEV_VAL" / "acc.csv").read_text().splitlines()
    assert acc == ["protocol,split,Overall,Art & Design,Art,Biology", "vlmevalkit,dev,50.0,50.0,50.0,",
                   "vlmevalkit,validation,25.0,0.0,0.0,33.33", "aloe,dev,50.0,50.0,50.0,",
                   "aloe,validation,75.0,100.0,100.0,66.67"]
    assert (tmp_path / "m1" / "PathMMU_VAL" / "acc.csv").read_text() == render_acc_csv(
        json.loads((tmp_path / "m1" / "scores.json").read_text())["benchmarks"]["PathMMU_VAL"])
    assert not (tmp_path / "m1" / "chest").exists()


def test_robustness_columns_published_all_or_listed(tmp_path):
    handwritten_scores(tmp_path)
    models = collect_scores(tmp_path)
    published = [f"{task} {kind}" for task, kind in robustness_columns(models)]
    assert published == ["cls base", "cls cap", "cls pmt", "cls syc", "det base", "det cap", "det pmt", "det syc",
                         "det leg"]
    assert robustness_columns(models, "all") == [
        ("cls", "base"), ("cls", "cap"), ("cls", "pmt"), ("cls", "syc"), ("cls", "leg"), ("det", "base"),
        ("det", "cap"), ("det", "pmt"), ("det", "syc"), ("det", "leg"), ("det", "region")]
    assert parse_robustness_columns("det:region, cls leg") == (("det", "region"), ("cls", "leg"))
    with pytest.raises(UsageError, match="'cls:lag' is not a column"):
        parse_robustness_columns("cls:lag")
    text = render_markdown(models)
    rows = table(text, "## Adversarial robustness (accuracy, %, Base then each perturbation): VLMEvalKit")
    assert rows[0] == ["model", "cls Base", "cls Cap", "cls Pmt", "cls Syc", "det Base", "det Cap", "det Pmt",
                       "det Syc", "det Leg"]
    assert rows[2] == ["m1", "50.0", "0.0", "50.0", "0.0", "100.0", "50.0", "50.0", "0.0", "50.0"]
    aloe_rows = table(text, "## Adversarial robustness (accuracy, %, Base then each perturbation): aloe")
    assert aloe_rows[2] == ["m1"] + ["50.0"] * 4 + ["100.0"] * 5


def test_cli_table_prints_the_new_tables_and_takes_the_robustness_columns(tmp_path):
    handwritten_scores(tmp_path, "m1", created=1)
    handwritten_scores(tmp_path, "m2", created=2)
    result = aloe("eval", "--table", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == render_markdown(collect_scores(tmp_path))
    assert "| m2 | validation | aloe | 75.0 | 100.0 | 100.0 | 66.7 |" in result.stdout
    assert "cls Leg" not in result.stdout and "det Region" not in result.stdout
    every = aloe("eval", "--table", str(tmp_path), "--robustness-columns", "all")
    assert every.returncode == 0, every.stderr
    assert "| model | cls Base | cls Cap | cls Pmt | cls Syc | cls Leg | det Base |" in every.stdout
    assert "| det Leg | det Region |" in every.stdout
    listed = aloe("eval", "--table", str(tmp_path), "--robustness-columns", "cls:leg,det:region")
    assert listed.returncode == 0 and "| model | cls Leg | det Region |\n" in listed.stdout
    assert "| m1 | 0.0 | 0.0 |" in listed.stdout
    bad = aloe("eval", "--table", str(tmp_path), "--robustness-columns", "cls:lag")
    assert bad.returncode == 2 and "'cls:lag' is not a column" in bad.stderr


# ----------------------------------------------------------------------------- an eval run end to end

ORGANS = {"A": "Liver", "B": "Spleen", "C": "Kidney", "D": "Lung"}


def pathmmu_tsv(path):
    """A PathMMU-shaped VLMEvalKit TSV whose served 'model' answers what each question's marker says; the
    second answer is one VLMEvalKit's rules cannot read and aloe's can."""
    rows = []
    for index, (answer, reply, category, task, split) in enumerate([
            ("A", "A", "EduContent", "cls", "val"),
            ("B", "I would say B is correct, not A.", "EduContent", "cls", "val"),
            ("C", "C", "PubMed", "det", "test"), ("D", "D", "PubMed", "det", "test")]):
        rows.append({"index": str(index), "question": f"Which organ is in slide {index}? [answer={reply}]",
                     **ORGANS, "answer": answer, "category": category, "l2-category": "histology", "task": task,
                     "split": split, "image": png_base64(scan(index, size=64))})
    return write_tsv(path, rows)


def test_an_eval_run_writes_the_breakdown_and_the_published_robustness_columns(tmp_path):
    bench = pathmmu_tsv(tmp_path / "PathMMU_VAL.tsv")
    out = tmp_path / "out"
    with FakeOpenAIServer() as server:
        result = aloe("eval", "--model", "served", "--backend", "openai", "--base-url", server.url,
                      "--benchmark", str(bench), "--perturb", "base,cap,pmt,syc,leg", "-o", str(out),
                      "--retry-backoff", "0.01", "--concurrency", "4")
        prompt = server.requests[0].body["messages"][-1]["content"][-1]["text"]
    assert result.returncode == 0, result.stderr
    assert prompt.endswith("D. Lung\nPlease select the correct answer from the options above.")  # PathMMU: MCQ
    scores = json.loads((out / "served" / "scores.json").read_text())["benchmarks"]["PathMMU_VAL"]
    assert (scores["published"], scores["vlmevalkit_name"]) == ("PathMMU", "PathMMU_VAL")
    text = (out / "results.md").read_text()
    assert table(text, "## Benchmarks (accuracy, %): VLMEvalKit")[2] == ["served", "75.0"]
    assert table(text, "## Benchmarks (accuracy, %): aloe")[2] == ["served", "100.0"]
    breakdown = table(text, "## PathMMU_VAL: accuracy per split and category")
    assert breakdown[0] == ["model", "split", "protocol", "Overall", "histology", "EduContent", "PubMed"]
    assert breakdown[2:] == [["served", "test", "VLMEvalKit", "100.0", "100.0", "-", "100.0"],
                             ["served", "val", "VLMEvalKit", "50.0", "50.0", "50.0", "-"],
                             ["served", "test", "aloe", "100.0", "100.0", "-", "100.0"],
                             ["served", "val", "aloe", "100.0", "100.0", "100.0", "-"]]
    acc = (out / "served" / "PathMMU_VAL" / "acc.csv").read_text().splitlines()
    assert acc == ["protocol,split,Overall,histology,EduContent,PubMed", "vlmevalkit,test,100.0,100.0,,100.0",
                   "vlmevalkit,val,50.0,50.0,50.0,", "aloe,test,100.0,100.0,,100.0", "aloe,val,100.0,100.0,100.0,"]
    robustness = table(text, "## Adversarial robustness (accuracy, %, Base then each perturbation): VLMEvalKit")
    assert robustness[0] == ["model", "cls Base", "cls Cap", "cls Pmt", "cls Syc", "det Base", "det Cap", "det Pmt",
                             "det Syc", "det Leg"]
    assert robustness[2] == ["served"] + ["50.0"] * 4 + ["100.0"] * 5
    aloe_robustness = table(text, "## Adversarial robustness (accuracy, %, Base then each perturbation): aloe")
    assert aloe_robustness[2] == ["served"] + ["100.0"] * 9
    every = aloe("eval", "--table", str(out), "--robustness-columns", "all")
    assert every.returncode == 0 and "| served | 50.0 | 50.0 | 50.0 | 50.0 | 50.0 | 100.0 |" in every.stdout


def test_the_breakdown_has_vlmevalkits_columns_and_figures_for_mmmu(tmp_path):
    """MMMU_DEV_VAL's stored answers, scored under the VLMEvalKit protocol: acc.csv has the columns and figures of
    the `_acc` table VLMEvalKit's own code wrote for them, and the main table shows the validation split."""
    from test_vlmevalkit_conformance import DATA, verdict_lines

    from aloe_cli.evaluation.results import save_scores
    from aloe_cli.evaluation.scoring import benchmark_scores

    scores = benchmark_scores(line for _, line in verdict_lines("MMMU_DEV_VAL"))
    model_dir = tmp_path / "m"
    (model_dir / "MMMU_DEV_VAL").mkdir(parents=True)
    save_scores(model_dir, "m", {"MMMU_DEV_VAL": scores})
    write_tables(tmp_path)
    facts = json.loads((DATA / "MMMU_DEV_VAL_acc.json").read_text())
    rows = list(csv.reader(io.StringIO((model_dir / "MMMU_DEV_VAL" / "acc.csv").read_text())))
    assert rows[0][1:] == list(facts[0])  # split, Overall, the l2-category, the categories: VLMEvalKit's order
    ours = {row[1]: [float(value) for value in row[2:]] for row in rows[1:] if row[0] == "vlmevalkit"}
    assert ours == {fact["split"]: [round(100.0 * value, 2) for value in list(fact.values())[1:]] for fact in facts}
    validation = next(fact for fact in facts if fact["split"] == "validation")
    text = (tmp_path / "results.md").read_text()
    assert table(text, "## Benchmarks (accuracy, %): VLMEvalKit")[2] == ["m", f"{100 * validation['Overall']:.1f}"]
