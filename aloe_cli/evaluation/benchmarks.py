"""Benchmark files -> evaluation items.

Two formats, read with the record readers of `aloe_cli.data.io`:
- VLMEvalKit TSV: `index`, `question`, base64 `image` (or `image_path`), options `A`..`J`, `answer`,
  optional `hint`, `category`, `l2-category`, `split`, and the extras `kind`, `task`, `pair_id`.
- JSONL items: `{id, question, options?, answer, kind?: mcq|yesno|open, images?, category?, l2_category?,
  split?, task?: cls|det, pair_id?}` (`options` an object letter -> text, or a list lettered A, B, ...).

Each item also carries its fields as VLMEvalKit holds them (`EvalItem.vlmevalkit`): a TSV's text columns
as pandas reads them (`aloe_cli.evaluation.vlmevalkit.read_tsv_fields`), a JSONL item's as a TSV made from
it would read (NA-like strings missing, the answer as its letter or Yes/No).

An item without a `task` gets one (`infer_task`): `det` when its answer is a box or its question asks
where something is, else `cls`.

The kind, when not given, is mcq when there are options, yesno when the answer is yes or no, else open.
An item is text-only when it has no image. A benchmark is named after its file's stem unless given as
NAME=FILE. Problems with one item (a missing answer, an answer letter with no such option) are
`RecordError`s naming the file, line and field, carried on the item so `--on-error skip` can count
them; problems with the whole file (missing, empty, no answer column) are `AloeError`s.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from aloe_cli.data.io import STDIO, Item, StreamCopies, input_format, read_file, source_name
from aloe_cli.data.records import text_of
from aloe_cli.data.streams import is_stream
from aloe_cli.errors import AloeError, RecordError, UsageError
from aloe_cli.evaluation import registry, vlmevalkit
from aloe_cli.evaluation.extraction import LETTERS, normalize_yesno
from aloe_cli.evaluation.open_answers import reference_box
from aloe_cli.evaluation.vlmevalkit import VlmFields

KINDS = ("mcq", "yesno", "open")
TASKS = ("cls", "det")
_NAME = re.compile(r"^[A-Za-z0-9][\w.\-]*$")


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    path: str
    vlmevalkit_name: str | None = None  # the VLMEvalKit dataset it is (selects VLMEvalKit's prompt and metric)
    published: str | None = None  # the published benchmark it is (evaluation.registry), for the table

    @property
    def vlmevalkit_dataset(self) -> str:
        """The name that picks VLMEvalKit's prompt and metric variant."""
        return self.vlmevalkit_name or self.name


@dataclass
class EvalItem:
    """One benchmark question, as the model will be asked it and scored on it."""

    id: str
    benchmark: str
    kind: str
    question: str
    answer: str  # a letter (mcq), "yes"/"no" (yesno), or the reference text (open)
    options: dict[str, str] | None = None
    hint: str | None = None
    images: list = field(default_factory=list)
    image_root: Path | None = None
    category: str | None = None
    l2_category: str | None = None
    split: str | None = None
    task: str | None = None
    pair_id: str | None = None
    where: str = ""
    vlmevalkit: VlmFields | None = None  # the fields as VLMEvalKit holds them (None: derived from the above)

    def fields(self) -> dict[str, Any]:
        """The item's part of a prediction line (no images, no file position)."""
        values = asdict(self)
        for private in ("images", "image_root", "where", "hint", "vlmevalkit"):
            values.pop(private)
        return values

    def vlmevalkit_fields(self) -> VlmFields:
        """The item as VLMEvalKit holds it; for an item not read from a TSV, as a TSV made from it would read."""
        if self.vlmevalkit is not None:
            return self.vlmevalkit
        options = {letter: text for letter, text in (self.options or {}).items() if vlmevalkit.na_cell(text)}
        answer = canonical_answer(self.kind, self.answer)
        return VlmFields(self.question, vlmevalkit.na_cell(self.hint), options, answer)


def canonical_answer(kind: str, answer: str) -> str:
    """The reference as a VLMEvalKit TSV writes it: the letter, or Yes / No."""
    return answer.capitalize() if kind == "yesno" else answer


def parse_benchmark_spec(text: str) -> BenchmarkSpec:
    """`NAME=FILE` or `FILE` (named after its stem). `-` is standard input; a FIFO, `/dev/stdin` or `<(...)`
    is a stream (JSONL unless its name ends in .tsv), read once. A published benchmark (by name or by its
    VLMEvalKit file name) gets its VLMEvalKit dataset name; `MMLU` alone points at --lm-eval-tasks."""
    name, sep, path = text.partition("=")
    if sep and _NAME.match(name) and "/" not in name:
        spec = BenchmarkSpec(name, path)
    else:
        spec = BenchmarkSpec(source_name(text), text)
    if spec.path != STDIO and not (Path(spec.path).is_file() or is_stream(spec.path)):
        if not sep and registry.lm_eval_hint(text):
            raise UsageError(registry.lm_eval_hint(text), "--benchmark")
        raise AloeError(f"benchmark file not found: {spec.path}" + (registry.missing_file_hint(text) if not sep
                                                                     else ""))
    if input_format(spec.path) not in ("tsv", "jsonl"):
        raise AloeError(f"{spec.path}: a benchmark must be a VLMEvalKit .tsv or a .jsonl file")
    found = registry.recognise(spec.name, spec.path)
    if found is not None:
        spec = replace(spec, vlmevalkit_name=found.vlmevalkit_name, published=found.benchmark.name)
    return spec


def read_benchmark(spec: BenchmarkSpec, image_root: str | Path | None = None,
                   limit: int | None = None, streams: StreamCopies | None = None) -> list[Item]:
    """Every item of a benchmark, each with `annotations["eval_item"]` or an `error` naming line and field.

    Read through the shared record reader, so every row is normalised on read (embedded DICOM becomes PNG
    pixels without its header). A stream is read from its copy in `streams` when given (it can be read once)."""
    items: list[Item] = []
    seen: dict[str, str] = {}
    tsv = input_format(spec.path) == "tsv"
    columns_checked = not tsv
    rows = streams.read(spec.path, image_root) if streams is not None else read_file(spec.path, image_root)
    for position, item in enumerate(rows, start=1):
        if limit is not None and len(items) >= limit:
            break
        if item.error is None:
            try:
                if not columns_checked:
                    _check_tsv_columns(spec.path, item.record)
                    columns_checked = True
                eval_item = to_eval_item(item, spec.name, tsv=tsv, position=position)
                if eval_item.id in seen:
                    raise RecordError("duplicate_id", f"id {eval_item.id!r} was already used at {seen[eval_item.id]}",
                                      field="id" if not tsv else "index")
                seen[eval_item.id] = item.where
                item.annotations["eval_item"] = eval_item
            except RecordError as error:
                item.error = error.located(item.where)
        items.append(item)
    if not items:
        raise AloeError(f"{spec.path}: the benchmark has no items (empty file)")
    if tsv:
        _attach_vlmevalkit_fields(items, streams.get(spec.path) if streams is not None else spec.path)
    return items


def _attach_vlmevalkit_fields(items: list[Item], path: str) -> None:
    """Each TSV item gets its row as pandas reads it. Rows pair up by position, checked by `index`; when pandas
    reads the file differently (rows that do not pair up), each item keeps fields derived cell by cell."""
    rows = vlmevalkit.read_tsv_fields(path)
    if rows is None or len(rows) < len(items):
        return
    pairs = [(item.annotations["eval_item"], row) for item, row in zip(items, rows) if "eval_item" in item.annotations]
    if not all(_same_index(eval_item.id, row.get("index")) for eval_item, row in pairs):
        return
    for eval_item, row in pairs:
        eval_item.vlmevalkit = vlmevalkit.fields_from_row(row)


def _same_index(ours: str, theirs: str | None) -> bool:
    if theirs is None or ours == theirs:  # no index column: nothing to check
        return True
    try:
        return float(ours) == float(theirs)
    except ValueError:
        return False


def _check_tsv_columns(path: str, record: dict) -> None:
    if "answer" not in record.get("meta", {}):
        raise AloeError(f"{path}: VLMEvalKit TSV has no 'answer' column (field 'answer'); every benchmark item "
                        "needs its reference answer")


def to_eval_item(item: Item, benchmark: str, *, tsv: bool, position: int = 0) -> EvalItem:
    record = item.record
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    fields = meta if tsv else record
    user = next((m for m in record["messages"] if m["role"] == "user"), None)
    if user is None:
        raise RecordError("missing_field", "no question", field="question")
    options = _options(meta.get("options") if tsv else record.get("options"))
    hint = _text(meta.get("hint")) if tsv else _text(record.get("hint"))
    question = _question_text(text_of(user), meta.get("options"), meta.get("hint")) if tsv else text_of(user)
    answers = [m for m in record["messages"] if m["role"] == "assistant"]
    answer = _text(text_of(answers[-1])) if answers else None
    if answer is None:
        raise RecordError("missing_field", "missing or empty (every item needs its reference answer)", field="answer")
    kind = _kind(fields.get("kind"), options, answer)
    answer = _checked_answer(kind, answer, options)
    item_id = _text(meta.get("index") if tsv else record.get("id")) or str(position)  # else its place in the file
    task = _text(fields.get("task"))
    if task is not None and task.lower() not in TASKS:
        raise RecordError("invalid_field", f"must be one of {', '.join(TASKS)}, got {task!r}", field="task")
    task = task or infer_task(question, answer)
    return EvalItem(
        id=item_id, benchmark=benchmark, kind=kind, question=question.strip(), answer=answer,
        options=options if kind == "mcq" else None, hint=hint, images=list(record.get("images") or []),
        image_root=item.image_root, category=_text(fields.get("category")),
        l2_category=_text(fields.get("l2-category", fields.get("l2_category"))), split=_text(fields.get("split")),
        task=task.lower() if task else None, pair_id=_text(fields.get("pair_id")), where=item.where,
        vlmevalkit=None if tsv else _jsonl_fields(record, text_of(user), kind, answer))


def _jsonl_fields(record: dict, question: str, kind: str, answer: str) -> VlmFields:
    """A JSONL item as VLMEvalKit would hold it once written to a TSV: text as given, NA-like cells missing."""
    options = record.get("options")
    if isinstance(options, list):
        options = {LETTERS[i]: value for i, value in enumerate(options)}
    texts = {}
    for key, value in (options or {}).items():
        text = vlmevalkit.na_cell(None if value is None else str(value))
        if text is not None:
            texts[str(key).strip().upper()] = text
    hint = record.get("hint")
    return VlmFields(question, vlmevalkit.na_cell(None if hint is None else str(hint)), texts,
                     canonical_answer(kind, answer))


_GROUNDING_QUESTION = re.compile(r"\b(where|locat(e|es|ed|ing|ion)|locali[sz](e|es|ed|ing|ation)|box(es)?|bounding)\b",
                                 re.IGNORECASE)


def infer_task(question: str, answer: str) -> str:
    """`det` for an item with a reference box in its answer or a grounding question ("where", "locate",
    "box", "bounding"), else `cls`: the adversarial table's split when items carry no `task`."""
    if reference_box(answer) is not None or _GROUNDING_QUESTION.search(question):
        return "det"
    return "cls"


def _text(value: Any) -> str | None:
    """A field as text; empty, null and pandas' 'nan' count as missing."""
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return None if text in ("", "nan", "None") else text


def _options(value: Any) -> dict[str, str] | None:
    if value is None or value == {} or value == []:
        return None
    if isinstance(value, list):
        if len(value) > len(LETTERS):
            raise RecordError("invalid_field", f"at most {len(LETTERS)} options", field="options")
        return {LETTERS[i]: str(option) for i, option in enumerate(value)}
    if isinstance(value, dict):
        options = {}
        for key, option in value.items():
            letter = str(key).strip().upper()
            if len(letter) != 1 or letter not in LETTERS:
                raise RecordError("invalid_field", f"option keys must be letters A-J, got {key!r}", field="options")
            if _text(option) is not None:
                options[letter] = str(option).strip()
        return options or None
    raise RecordError("invalid_field", "must be an object letter -> text, or a list", field="options")


def _question_text(text: str, options: Any, hint: Any) -> str:
    """The bare question of a TSV row: the reader appended its options and prefixed its hint, as they are in
    the file (`aloe_cli.data.tsv.tsv_row_to_record`), before any is read as missing here."""
    if isinstance(options, dict) and options:
        block = "\nOptions:\n" + "\n".join(f"{letter}. {value}" for letter, value in options.items())
        text = text[:-len(block)] if text.endswith(block) else text
    hint = hint.strip() if isinstance(hint, str) else ""
    prefix = f"Hint: {hint}\n" if hint and hint != "nan" else ""
    return text[len(prefix):] if prefix and text.startswith(prefix) else text


def _kind(value: Any, options: dict | None, answer: str) -> str:
    kind = _text(value)
    if kind is not None:
        kind = kind.lower().replace("/", "").replace("-", "").replace("_", "")
        kind = {"yn": "yesno", "yorn": "yesno", "multiplechoice": "mcq", "vqa": "open"}.get(kind, kind)
        if kind not in KINDS:
            raise RecordError("invalid_field", f"must be one of {', '.join(KINDS)}, got {value!r}", field="kind")
        if kind == "mcq" and not options:
            raise RecordError("missing_field", "an mcq item needs options", field="options")
        return kind
    if options:
        return "mcq"
    return "yesno" if normalize_yesno(answer) is not None else "open"


def _checked_answer(kind: str, answer: str, options: dict[str, str] | None) -> str:
    if kind == "mcq":
        letter = answer.strip().rstrip(".").strip("()").upper()
        if letter in options:
            return letter
        by_text = [key for key, value in options.items() if value.strip().lower() == answer.strip().lower()]
        if len(by_text) == 1:  # some sets store the option's text instead of its letter
            return by_text[0]
        raise RecordError("invalid_answer", f"answer {answer!r} is not one of the options "
                          f"{', '.join(options)}", field="answer")
    if kind == "yesno":
        value = normalize_yesno(answer)
        if value is None:
            raise RecordError("invalid_answer", f"a yes/no item needs the answer yes or no, got {answer!r}",
                              field="answer")
        return value
    return answer


__all__ = ["BenchmarkSpec", "EvalItem", "KINDS", "TASKS", "infer_task", "parse_benchmark_spec", "read_benchmark",
           "to_eval_item"]
