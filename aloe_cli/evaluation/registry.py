"""The published benchmarks by name: what file each one is, how it is asked and scored, how it is recognised.

The published table has eight columns, in this order: PathMMU, GMAI-MMBench, OmniMedVQA, ProbMed, SLAKE,
MMMU (multimodal, run the way VLMEvalKit runs them), MultiMedQA and MMLU (text, run by
lm-evaluation-harness). `recognise` finds the entry for `--benchmark NAME=FILE` from the name (the entry's
name or an alias, any case) or, failing that, from the file's stem when it is a VLMEvalKit dataset name
(`PathMMU_TEST.tsv`, `MMMU_DEV_VAL.tsv`, `GMAI_mm_bench_TEST_part_3.tsv`, ...). A benchmark found here
keeps the name it was given; the entry sets its VLMEvalKit dataset name (which selects VLMEvalKit's
prompt and metric variants) and its place in the table. Anything else is read as an unnamed benchmark.

docs/eval.md ("Published benchmarks") cites the source each entry follows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PublishedBenchmark:
    name: str  # the published table's column
    aliases: tuple[str, ...]  # other names it goes by (matched in any case)
    datasets: tuple[str, ...]  # VLMEvalKit dataset names (TSV stems) that are this benchmark; the first is the default
    obtain: str  # the file or dataset a user gets
    prompt: str
    metric: str
    lm_eval_task: str | None = None  # text benchmarks: the lm-evaluation-harness task or group that runs it
    stem_pattern: str | None = None  # other file stems that are this benchmark (VLMEvalKit's part files)
    stem_dataset: str | None = None  # ... and the VLMEvalKit dataset they belong to
    main_split: str | None = None  # the split whose Overall is the published figure, when the file has splits

    def default_dataset(self) -> str | None:
        return self.datasets[0] if self.datasets else None


MCQ_PROMPT = "VLMEvalKit's multiple-choice prompt for Qwen2-VL (Qwen2VLPromptMixin, MCQ)"

PUBLISHED: tuple[PublishedBenchmark, ...] = (
    PublishedBenchmark(
        "PathMMU", ("pathmmu", "path-mmu"), ("PathMMU_TEST", "PathMMU_VAL"),
        "VLMEvalKit TSV PathMMU_TEST.tsv or PathMMU_VAL.tsv (hf: Pfei111/PathMMU)",
        MCQ_PROMPT, "accuracy by exact matching (VLMEvalKit ImageMCQDataset, report_acc)"),
    PublishedBenchmark(
        "GMAI-MMBench", ("gmai-mmbench", "gmai_mmbench", "gmaimmbench", "gmai"),
        ("GMAI-MMBench_VAL", "GMAI-MMBench_TEST"),
        "VLMEvalKit TSV GMAI-MMBench_VAL.tsv (hf: VLMEval/GMAI-MMBench); the test set comes as "
        "GMAI_mm_bench_TEST_part_1..11.tsv (hf: OpenGVLab/GMAI-MMBench)",
        MCQ_PROMPT, "accuracy by exact matching, per split, category and l2-category (GMAIMMBenchDataset)",
        stem_pattern=r"gmai_mm_bench_test_part_\d+(_local)?", stem_dataset="GMAI-MMBench_TEST"),
    PublishedBenchmark(
        "OmniMedVQA", ("omnimedvqa", "omnimed-vqa", "omnimed"), ("OmniMedVQA",),
        "VLMEvalKit TSV parts omnimedbench_part_1..14.tsv (hf: KKYYKK/OmniMed_VLM), concatenated into "
        "OmniMedVQA.tsv or given one by one",
        MCQ_PROMPT, "accuracy by exact matching (VLMEvalKit OmniMedVQA, an ImageMCQDataset)",
        stem_pattern=r"omnimedbench_part_\d+(_local)?", stem_dataset="OmniMedVQA"),
    PublishedBenchmark(
        "ProbMed", ("probmed", "prob-med"), (),
        "probmed.json (hf: rippleripple/ProbMed) as aloe JSONL items, kind yesno, with a pair_id per image and "
        "question type (<id>-modality, <id>-entity, ...): the original question and its adversarial twin",
        "vlmevalkit protocol: the question as written (a custom dataset's prompt); aloe: its yes/no prompt",
        "paired accuracy: a unit counts only if all of its questions are right (ProbMed's calculate_score.py)"),
    PublishedBenchmark(
        "SLAKE", ("slake", "slake-vqa", "slake_en"), (),
        "test.json of hf: BoKelvin/SLAKE (English questions, q_lang en) as aloe JSONL items; open questions "
        "kind open, closed ones yesno",
        "vlmevalkit protocol: the question as written (a custom dataset's prompt); aloe: its open-ended and "
        "yes/no prompts",
        "open answers graded 0 / 0.5 / 1 by the --judge (without it: exact match and the VQA score, not judged); "
        "closed ones by exact match"),
    PublishedBenchmark(
        "MMMU", ("mmmu",), ("MMMU_DEV_VAL", "MMMU_TEST"),
        "VLMEvalKit TSV MMMU_DEV_VAL.tsv (dev + validation splits; the test split has no public answers)",
        "VLMEvalKit's MMMU prompt for Qwen2-VL (all images first, the prompt stripped)",
        "accuracy by exact matching per split; the published figure is the validation split's Overall "
        "(MMMUDataset.report_primary_metric)", main_split="validation"),
    PublishedBenchmark(
        "MultiMedQA", ("multimedqa", "multi-medqa"), (),
        "lm-evaluation-harness group multimedqa (pubmedqa, medmcqa, medqa_4options and six MMLU medical "
        "subjects; hf datasets fetched by lm-eval)",
        "lm-eval's task templates (zero-shot)", "acc, weighted by task size (lm-eval's group aggregate)",
        lm_eval_task="multimedqa"),
    PublishedBenchmark(
        "MMLU", ("mmlu",), (),
        "lm-evaluation-harness group mmlu (hf: cais/mmlu, 57 subjects)",
        "lm-eval's mmlu template: question, A.-D. options, 'Answer:' (zero-shot)",
        "acc, weighted by subject size (lm-eval's group aggregate)", lm_eval_task="mmlu"),
)


def _key(text: str) -> str:
    return text.strip().lower()


_BY_NAME = {_key(name): entry for entry in PUBLISHED for name in (entry.name, *entry.aliases)}
_BY_DATASET = {_key(dataset): (entry, dataset) for entry in PUBLISHED for dataset in entry.datasets}


@dataclass(frozen=True)
class Recognised:
    benchmark: PublishedBenchmark
    vlmevalkit_name: str | None  # None for benchmarks VLMEvalKit does not have


def lookup(text: str) -> PublishedBenchmark | None:
    """The entry a benchmark name stands for (its name, an alias, or one of its VLMEvalKit dataset names)."""
    key = _key(text)
    found = _BY_NAME.get(key) or (_BY_DATASET[key][0] if key in _BY_DATASET else None)
    return found or _from_stem(key)[0]


def _from_stem(stem: str) -> tuple[PublishedBenchmark | None, str | None]:
    key = _key(stem)
    if key in _BY_DATASET:
        return _BY_DATASET[key]
    for entry in PUBLISHED:
        if entry.stem_pattern and re.fullmatch(entry.stem_pattern, key):
            return entry, entry.stem_dataset
    return None, None


def recognise(name: str | None, path: str | None) -> Recognised | None:
    """The published benchmark `--benchmark [NAME=]PATH` is, from the name first, then the file's stem."""
    by_name = lookup(name) if name else None
    by_stem, dataset = _from_stem(Path(path).name.split(".")[0]) if path else (None, None)
    entry = by_name or by_stem
    if entry is None:
        return None
    if dataset is None or by_stem is not entry:  # the stem does not say which VLMEvalKit file: the default
        named = _BY_DATASET.get(_key(name or ""))
        dataset = named[1] if named and named[0] is entry else entry.default_dataset()
    return Recognised(entry, dataset)


def lm_eval_hint(text: str) -> str | None:
    """For `--benchmark MMLU` (no file): where that benchmark is run instead, or None."""
    entry = _BY_NAME.get(_key(text))
    if entry is None or entry.lm_eval_task is None:
        return None
    return (f"{entry.name} is a text benchmark run by lm-evaluation-harness: use --lm-eval-tasks "
            f"{entry.lm_eval_task} (pip install 'aloe-cli[eval]')")


def missing_file_hint(text: str) -> str:
    """What to add to 'benchmark file not found' when the text names a published benchmark."""
    entry = _BY_NAME.get(_key(text)) or lookup(text)
    if entry is None:
        return ""
    return f" ({entry.name} is read from {entry.obtain}: give --benchmark {entry.name}=FILE)"


def published_rank(name: str, published: str | None = None) -> int | None:
    """The benchmark's column position in the published table (None: not a published benchmark)."""
    entry = lookup(published) if published else None
    entry = entry or lookup(name)
    return None if entry is None else PUBLISHED.index(entry)


__all__ = ["PUBLISHED", "PublishedBenchmark", "Recognised", "lm_eval_hint", "lookup", "missing_file_hint",
           "published_rank", "recognise"]
