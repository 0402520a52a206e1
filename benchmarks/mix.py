"""Benchmark `aloe mix`: loss-token counting speed, and a large mixture end to end through the CLI.

    python benchmarks/mix.py [--count-records 6000] [--records 1000000] [--workdir bench_out/mix]
    python benchmarks/mix.py --skip-counting --records 3500000 --caches cold,warm   # the published size

Prints
(a) records/s of the batched counter (aloe_cli.modeling.loss_tokens: tokenizers + jinja2,
    no transformers) vs one transformers
    `apply_chat_template(..., tokenize=True, return_assistant_tokens_mask=True)`
    call per record, and their ratio, on two sets: a realistic mix (VQA with
    short, often repeated answers; open questions; long text answers;
    multiple choice; multi-turn) and the same shapes with every answer
    distinct. Counts are asserted identical. Target: >= 3x.
(b) a synthetic text-only input of --records short records mixed end to end
    through the CLI (`aloe mix --recipe ... -o ...`): wall time, records/s and
    peak RSS of the CLI process (its ru_maxrss, taken by a small launcher so
    that this process's own memory does not leak into it; target < 1 GiB),
    next to the
    peak RSS of the same command on a 4-record input (the fixed cost: Python,
    numpy, tokenizers, the CLI). `--caches` picks the runs: `cold` (empty
    loss-token cache: every record is tokenized), `warm` (a changed recipe,
    every count from the cache); a warm run without a cold one before it
    fills the cache first with an untimed dry run.

The tokenizer is the tiny offline Qwen2-VL fixture's (byte-level BPE with
Qwen2's pre-tokenizer and special tokens, 1024-entry vocabulary, so it cuts
text into more tokens than the real one).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the liver shows a small hypodense lesion with mild edema and no acute abnormality in the chest "
         "left right lung heart brain kidney spine normal fracture mass effusion nodule contrast scan "
         "patient history suggests follow up recommended findings consistent pneumonia").split()
ORGANS = ["liver", "left lung", "right kidney", "spleen", "heart", "brain", "pancreas", "bladder"]


# ----------------------------------------------------------------------------- (a) counting

def words(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


def realistic_conversation(rng: random.Random, i: int, distinct: bool) -> list[dict]:
    """One of five shapes seen in medical SFT data; `distinct` makes every answer unique."""
    tag = f" (case {i})" if distinct else ""
    kind = i % 5
    if kind == 0:  # closed VQA: yes/no or one word
        answer = rng.choice(["Yes.", "No.", "Liver.", "Left.", "CT.", "MRI."]) + tag
        return [{"role": "user", "content": [{"type": "image"}, text_part(f"Is there a lesion in the "
                                                                          f"{rng.choice(ORGANS)}?")]},
                {"role": "assistant", "content": [text_part(answer)]}]
    if kind == 1:  # open VQA
        return [{"role": "user", "content": [{"type": "image"}, text_part("Describe the findings.")]},
                {"role": "assistant", "content": [text_part(words(rng, 8, 30) + "." + tag)]}]
    if kind == 2:  # long text answer (medical QA)
        return [{"role": "user", "content": [text_part(words(rng, 15, 40) + "?")]},
                {"role": "assistant", "content": [text_part(words(rng, 60, 180) + "." + tag)]}]
    if kind == 3:  # multiple choice with a long prompt
        options = "\n".join(f"{letter}. {words(rng, 2, 6)}" for letter in "ABCD")
        return [{"role": "system", "content": "You are a careful radiologist."},
                {"role": "user", "content": [{"type": "image"}, text_part(words(rng, 20, 50) + "?\n" + options)]},
                {"role": "assistant", "content": [text_part(rng.choice("ABCD") + tag)]}]
    turns = []  # multi-turn
    for _ in range(rng.randint(2, 4)):
        turns.append({"role": "user", "content": [text_part(words(rng, 4, 12) + "?")]})
        turns.append({"role": "assistant", "content": [text_part(words(rng, 5, 25) + "." + tag)]})
    return turns


def bench_counting(model_dir: Path, count: int, runs: int = 5) -> None:
    """Both ways of counting, alternated `runs` times (so both see the same machine load); best of each."""
    from transformers import AutoTokenizer

    from aloe_cli.modeling.loss_tokens import load_counter
    sys.path.insert(0, str(ROOT / "tests"))  # the reference count is a test oracle: it lives with the tests
    from oracles import reference_count

    print(f"(a) loss-token counting, {count} records, best of {runs} alternated runs")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))  # the reference only; aloe does not load it
    for distinct in (False, True):
        rng = random.Random(0)
        conversations = [realistic_conversation(rng, i, distinct) for i in range(count)]

        def one_call_per_record(tokenizer, conversations):
            return [reference_count(tokenizer, messages) for messages in conversations]

        def batched(counter, conversations):
            jobs = ((None, conversations[i:i + 1024]) for i in range(0, len(conversations), 1024))
            return [n for _, results in counter.count_pipelined(jobs) for n in results]

        slow_s = fast_s = float("inf")
        for _ in range(runs):
            start = time.perf_counter()
            expected = one_call_per_record(tokenizer, conversations)
            slow_s = min(slow_s, time.perf_counter() - start)
            counter = load_counter(str(model_dir))  # fresh: nothing remembered from an earlier run
            start = time.perf_counter()
            counts = batched(counter, conversations)
            fast_s = min(fast_s, time.perf_counter() - start)
            assert counts == expected, "batched counts differ from apply_chat_template's assistant mask"
        name = "every answer distinct" if distinct else "realistic mix"
        print(f"    {name:22s} apply_chat_template per record: {count / slow_s:6.0f} rec/s   "
              f"batched: {count / fast_s:6.0f} rec/s   ratio {slow_s / fast_s:4.1f}x   "
              f"(counts identical, {sum(expected):,} loss tokens)")


# ----------------------------------------------------------------------------- (b) end to end

SOURCES = [("med-a", "medical"), ("med-b", "medical"), ("gen-a", "general"), ("gen-b", "general")]


def write_large_input(folder: Path, records: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{name}.jsonl" for name, _ in SOURCES]
    marker = folder / f".complete-{records}"
    if marker.exists():
        return paths
    rng = random.Random(1)
    handles = [path.open("w") for path in paths]
    for i in range(records):
        s = i % len(SOURCES)
        short = s % 2 == 0  # the -a sources answer in a few words, the -b sources at length
        record = {"id": f"{SOURCES[s][0]}-{i}", "messages": [
            {"role": "user", "content": [text_part(words(rng, 4, 10) + "?")]},
            {"role": "assistant", "content": [text_part(words(rng, 2, 6) if short else words(rng, 10, 30))]}]}
        handles[s].write(json.dumps(record) + "\n")
    for handle in handles:
        handle.close()
    marker.touch()
    return paths


def recipe_text(model_dir: Path, data: Path, medical_share: float) -> str:
    lines = [f"tokenizer: {model_dir}", "seed: 0", "targets:", f"  medical/text: {medical_share}",
             f"  general/text: {round(1 - medical_share, 6)}", "sources:"]
    for name, domain in SOURCES:
        lines += [f"  - name: {name}", f"    paths: {data / f'{name}.jsonl'}", f"    domain: {domain}"]
    return "\n".join(lines) + "\n"


# Linux keeps the memory of the process that forked a child as that child's ru_maxrss high-water mark
# (through exec), so a CLI started from this process would report this process's RSS whenever that is
# larger (after (a), transformers and torch: ~0.6 GiB). A small launcher starts the CLI and reports its
# ru_maxrss instead.
_LAUNCHER = ("import os, subprocess, sys; child = subprocess.Popen(sys.argv[2:]); "
             "_, status, usage = os.wait4(child.pid, 0); "
             "os.write(int(sys.argv[1]), b'%d %d' % (usage.ru_maxrss, os.waitstatus_to_exitcode(status)))")


def run_cli(args: list[str]) -> tuple[float, float, str]:
    """Run `python -m aloe_cli ARGS`; return (wall s, peak RSS MiB of that process, stderr)."""
    read_end, write_end = os.pipe()
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCHER, str(write_end), sys.executable, "-m", "aloe_cli", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, pass_fds=(write_end,))
    os.close(write_end)
    stderr = proc.stderr.read().decode()
    proc.wait()
    elapsed = time.perf_counter() - start
    with os.fdopen(read_end, "rb") as report:
        maxrss_kib, code = (int(field) for field in report.read().split())
    if code != 0:
        raise SystemExit(f"aloe {' '.join(args)} failed:\n{stderr}")
    return elapsed, maxrss_kib / 1024, stderr


def mix_args(model_dir: Path, workdir: Path, data: Path, share: float, cache: Path, dry_run: bool = False
             ) -> list[str]:
    recipe = workdir / "recipe.yaml"
    recipe.write_text(recipe_text(model_dir, data, share))
    args = ["mix", "--recipe", str(recipe), "--report", str(workdir / "report.json"), "--cache", str(cache)]
    return args + (["--dry-run"] if dry_run else ["-o", str(workdir / "mixture.jsonl")])


def bench_end_to_end(model_dir: Path, workdir: Path, records: int, caches: list[str]) -> None:
    print(f"(b) end to end through the CLI: {records:,} short text-only records, 4 sources, 2 cells")
    data = workdir / ("data" if records == 1_000_000 else f"data-{records}")
    started = time.perf_counter()
    write_large_input(data, records)
    print(f"    input ready in {data} ({time.perf_counter() - started:.0f} s, "
          f"{sum(p.stat().st_size for p in data.glob('*.jsonl')) / 2 ** 20:,.0f} MiB)")
    small = workdir / "data-4"
    write_large_input(small, 4)
    _, baseline, _ = run_cli(mix_args(model_dir, workdir, small, 0.6, workdir / "baseline.sqlite"))
    print(f"    fixed cost: peak RSS {baseline:.0f} MiB for the same command on a 4-record input")
    cache = workdir / "tokens.sqlite"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{cache}{suffix}").unlink(missing_ok=True)
    if "warm" in caches and "cold" not in caches:
        print("    filling the loss-token cache (untimed dry run) ...")
        run_cli(mix_args(model_dir, workdir, data, 0.6, cache, dry_run=True))
    runs = [(label, share) for label, share in (("cold", 0.6), ("warm", 0.5)) if label in caches]
    for label, share in runs:
        elapsed, rss, _ = run_cli(mix_args(model_dir, workdir, data, share, cache))
        summary = json.loads((workdir / "report.json").read_text())
        shares = {cell: summary["cells"][cell]["share_after"] for cell in ("medical/text", "general/text")}
        name = "cold cache" if label == "cold" else "warm cache, changed recipe"
        print(f"    {name:27s} {elapsed:6.1f} s  {summary['read'] / elapsed:8.0f} records/s read  "
              f"peak RSS {rss:6.0f} MiB (+{rss - baseline:.0f} MiB, "
              f"{(rss - baseline) * 2 ** 20 / records:.0f} B/record over the fixed cost)  "
              f"wrote {summary['written']:,}  shares {shares}  "
              f"(count {summary['seconds']['count']:.0f} s, plan {summary['seconds']['plan']:.1f} s, "
              f"write {summary['seconds'].get('write', 0):.0f} s, cache hits {summary['token_cache']['hits']:,})")
        assert rss < 1024, f"peak RSS {rss:.0f} MiB is over 1 GiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count-records", type=int, default=6000)
    parser.add_argument("--records", type=int, default=1_000_000)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench_out" / "mix")
    parser.add_argument("--skip-counting", action="store_true", help="skip (a)")
    parser.add_argument("--skip-end-to-end", action="store_true", help="skip (b)")
    parser.add_argument("--caches", default="cold,warm",
                        help="(b)'s runs, comma-separated: cold (empty loss-token cache), warm (changed recipe)")
    args = parser.parse_args()
    caches = [c for c in args.caches.split(",") if c]
    if not caches or set(caches) - {"cold", "warm"}:
        parser.error("--caches takes cold, warm or cold,warm")
    from aloe_cli.modeling.tiny import build_tiny_qwen2vl

    args.workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.workdir / "tiny"
    if not (model_dir / "tokenizer.json").exists():
        build_tiny_qwen2vl(model_dir)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPU(s), load average before the run "
          f"{os.getloadavg()[0]:.2f}")
    if not args.skip_counting:
        bench_counting(model_dir, args.count_records)
    if not args.skip_end_to_end:
        bench_end_to_end(model_dir.resolve(), args.workdir.resolve(), args.records, caches)


if __name__ == "__main__":
    main()
