"""The demo's synthetic task: data a tiny model learns on a CPU in minutes, generated on the spot.

Everything is drawn from a seed, so the same seed writes the same bytes:

- `lesion-vqa` (medical, multimodal): a grey scan-like 56x56 image with a bright lesion in one
  quadrant, or none. Four question kinds, in the prompt forms VLMEvalKit uses for Qwen2-VL:
  which quadrant (multiple choice, answered with the option's letter), is there a lesion (yes/no),
  where is it (open, a few words) and a detection item answered with a Qwen2-VL grounding box.
  A share of these records carries a *helpful hint* naming the correct answer, either as a caption
  in the prompt or as a user's guess (the `pmt` and `syc` forms of `HINT_FORMS`). In the training
  data hints are always right, as they mostly are in instruction data, so the model learns to trust
  them; a wrong hint at evaluation then misleads it, and stage 2 (wrong hints, correct targets)
  teaches it to look at the image instead.
- `shapes-vqa` (general, multimodal): a coloured circle, square or triangle; its colour as multiple
  choice, its shape as an open question.
- `med-facts` (medical, text) and `arithmetic` (general, text): answers checkable by a rule.
- Planted faults a curation pipeline must catch: wrong and empty answers (`meta.planted`), and
  evaluation images copied into the training data, byte for byte or re-encoded as JPEG (with the
  same pHash, which is what `aloe dedup` matches).
- The evaluation sets, in VLMEvalKit TSV form: `demo-med.tsv` (mcq, yesno, open and det items, with
  `kind`, `task` cls|det and `category`) and `demo-general.tsv`.

The pictures are drawn (and read back from their pixels) in `demo_images.py`; the rule a stand-in
judge can apply (pixels and fact tables, never `meta`) is in `demo_rules.py`.
"""

from __future__ import annotations

import base64
import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from aloe_cli.data.demo_images import (
    COLOURS,
    IMAGE_SIZE,
    QUADRANTS,
    SHAPES,
    hash_preserving_jpeg,
    lesion_scan,
    png_bytes,
    shape_image,
)
from aloe_cli.data.grounding import format_object, pixels_to_grounding

LETTERS = "ABCD"
LESION = "lesion"
YES, NO = "Yes", "No"

QUADRANT_QUESTION = "Which quadrant holds the lesion?"
PRESENCE_QUESTION = "Is there a lesion?"
LOCATION_QUESTION = "Where is the lesion?"
DETECT_QUESTION = "Locate the lesion and give its bounding box."
COLOUR_QUESTION = "What colour is the object?"
SHAPE_QUESTION = "What shape is drawn?"

# The two prompt-borne hint forms, written once: `pmt` (a caption in the prompt) and `syc` (the user's
# own guess). Training hints name the right answer, adversarial ones a wrong one.
HINT_FORMS = {
    "pmt": lambda prompt, hint: f"Caption: {hint}\n{prompt}",
    "syc": lambda prompt, hint: f"{prompt}\nI'm fairly sure it's {hint}.",
}

# Source names and domains of the training set.
SOURCES = {"lesion-vqa": "medical", "shapes-vqa": "general", "med-facts": "medical", "arithmetic": "general"}

# Rule-checkable facts for the text-only medical set: question -> answer.
MED_FACTS = {
    "Which organ produces insulin?": "pancreas",
    "Which organ pumps blood through the body?": "heart",
    "Which organ filters the blood to make urine?": "kidney",
    "Which organ stores bile?": "gallbladder",
    "Which organ exchanges oxygen and carbon dioxide?": "lung",
    "Which bone protects the brain?": "skull",
    "Which gland makes thyroxine?": "thyroid",
    "What is the largest organ of the body?": "skin",
    "Which organ breaks down most drugs?": "liver",
    "Which vitamin prevents scurvy?": "vitamin C",
    "How many chambers does the heart have?": "four",
    "Which blood cells carry oxygen?": "red blood cells",
    "Which organ absorbs most nutrients?": "small intestine",
    "Which nerve carries vision to the brain?": "optic nerve",
    "Which muscle drives breathing?": "diaphragm",
    "Which organ stores urine?": "bladder",
}


# ----------------------------------------------------------------------------- prompts

def mcq_prompt(question: str, options: dict[str, str]) -> str:
    """VLMEvalKit's Qwen2-VL multiple-choice prompt; the answer is the option's letter."""
    lines = [f"Question: {question}", "Options:"] + [f"{letter}. {text}" for letter, text in options.items()]
    return "\n".join(lines + ["Please select the correct answer from the options above."])


def yesno_prompt(question: str) -> str:
    return f"{question} Please answer yes or no."


def open_prompt(question: str) -> str:
    return f"{question}\nPlease try to answer the question with short words or phrases if possible."


def item_prompt(kind: str, question: str, options: dict[str, str] | None) -> str:
    """The user text of an item: what `aloe eval` asks and what training shows."""
    if kind == "mcq":
        return mcq_prompt(question, options or {})
    if kind == "yesno":
        return yesno_prompt(question)
    if kind == "open":
        return open_prompt(question)
    return question  # det: the question already says what to answer with


def with_hint(prompt: str, form: str, hint: str) -> str:
    return HINT_FORMS[form](prompt, hint)


# ----------------------------------------------------------------------------- items

@dataclass
class Item:
    """One question about one image (or none), with everything needed to write it either way."""

    kind: str  # mcq | yesno | open | det
    task: str  # cls | det
    category: str
    question: str
    answer: str
    options: dict[str, str] | None = None
    image: bytes | None = None
    truth: str = ""  # the answer as words (option text, Yes/No, box text): what a hint names
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return item_prompt(self.kind, self.question, self.options)


QUADRANT_OPTIONS = dict(zip(LETTERS, QUADRANTS))
COLOUR_OPTIONS = dict(zip(LETTERS, COLOURS))


def lesion_box_text(box: tuple[int, int, int, int], size: int = IMAGE_SIZE) -> str:
    return format_object(LESION, pixels_to_grounding(box, size, size))


def lesion_item(rng: np.random.Generator, kind: str) -> Item:
    """A lesion question of `kind`; yes/no items have no lesion half of the time."""
    quadrant = None if kind == "yesno" and rng.random() < 0.5 else int(rng.integers(4))
    image, box = lesion_scan(rng, quadrant)
    data = png_bytes(image)
    meta = {"quadrant": QUADRANTS[quadrant] if quadrant is not None else None, "box": list(box) if box else None}
    if kind == "mcq":
        letter = LETTERS[quadrant]
        return Item("mcq", "cls", "lesion-quadrant", QUADRANT_QUESTION, letter, QUADRANT_OPTIONS, data,
                    QUADRANTS[quadrant], meta)
    if kind == "yesno":
        answer = NO if quadrant is None else YES
        return Item("yesno", "cls", "lesion-presence", PRESENCE_QUESTION, answer, None, data, answer, meta)
    if kind == "open":
        return Item("open", "cls", "lesion-location", LOCATION_QUESTION, QUADRANTS[quadrant], None, data,
                    QUADRANTS[quadrant], meta)
    text = lesion_box_text(box)
    return Item("det", "det", "lesion-box", DETECT_QUESTION, text, None, data, text, meta)


def shapes_item(rng: np.random.Generator, kind: str) -> Item:
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    data = png_bytes(shape_image(rng, colour, shape))
    meta = {"colour": colour, "shape": shape}
    if kind == "mcq":
        return Item("mcq", "cls", "object-colour", COLOUR_QUESTION, LETTERS[list(COLOURS).index(colour)],
                    COLOUR_OPTIONS, data, colour, meta)
    return Item("open", "cls", "object-shape", SHAPE_QUESTION, shape, None, data, shape, meta)


def fact_item(rng: np.random.Generator) -> Item:
    question = list(MED_FACTS)[rng.integers(len(MED_FACTS))]
    return Item("open", "cls", "med-fact", question, MED_FACTS[question], truth=MED_FACTS[question])


def arithmetic_item(rng: np.random.Generator) -> Item:
    a, b = (int(v) for v in rng.integers(1, 20, 2))
    plus = bool(rng.random() < 0.5)
    question = f"What is {a} plus {b}?" if plus else f"What is {max(a, b)} minus {min(a, b)}?"
    answer = str(a + b if plus else abs(a - b))
    return Item("open", "cls", "arithmetic", question, answer, truth=answer)


LESION_KINDS = ("mcq", "yesno", "open", "det")


def wrong_answer(rng: np.random.Generator, item: Item) -> tuple[str, str]:
    """A plausible wrong (answer, truth-words) for `item`, drawn from its own answer space."""
    if item.category in ("lesion-quadrant", "object-colour"):
        letter = str(rng.choice([x for x in item.options if x != item.answer]))
        return letter, item.options[letter]
    if item.category == "lesion-presence":
        other = NO if item.answer == YES else YES
        return other, other
    if item.category == "lesion-location":
        other = str(rng.choice([q for q in QUADRANTS if q != item.answer]))
        return other, other
    if item.category == "lesion-box":
        return other_quadrant_box(rng, item.meta["quadrant"])
    if item.category == "object-shape":
        other = str(rng.choice([s for s in SHAPES if s != item.answer]))
        return other, other
    if item.category == "med-fact":
        other = str(rng.choice([a for a in MED_FACTS.values() if a != item.answer]))
        return other, other
    other = str(int(item.answer) + int(rng.choice([-3, -2, -1, 1, 2, 3])))
    return other, other


def other_quadrant_box(rng: np.random.Generator, quadrant: str) -> tuple[str, str]:
    """The box text of a lesion drawn in another quadrant (what a wrong detection hint names)."""
    others = [i for i, q in enumerate(QUADRANTS) if q != quadrant]
    _, box = lesion_scan(rng, int(rng.choice(others)))
    text = lesion_box_text(box)
    return text, text


# ----------------------------------------------------------------------------- records

def to_record(item: Item, record_id: str, source: str, image_ref: str | None,
              hint: tuple[str, str] | None = None) -> dict:
    """An item as a training record; `hint` = (form, words) puts a hint into the prompt."""
    prompt = item.prompt if hint is None else with_hint(item.prompt, *hint)
    user = ([{"type": "image"}] if image_ref is not None else []) + [{"type": "text", "text": prompt}]
    meta = {"kind": item.kind, "task": item.task, "category": item.category, "truth": item.truth}
    if item.options:
        meta["options"] = dict(item.options)
    if hint is not None:
        meta["hint"] = {"form": hint[0], "text": hint[1]}
    meta.update({k: v for k, v in item.meta.items() if k not in meta})
    return {"id": record_id, "source": source, "domain": SOURCES[source],
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}],
            "images": [image_ref] if image_ref is not None else [], "meta": meta}


# ----------------------------------------------------------------------------- the data set

@dataclass(frozen=True)
class DemoConfig:
    """How much of everything to write. The defaults are the full demo; `QUICK` is the CI size."""

    lesion_records: int = 3200  # stage-1 lesion questions, the four kinds in equal parts
    hint_share: float = 0.4  # of the lesion records: a helpful (correct) hint in the prompt
    adversarial_records: int = 1600  # fresh lesion records without hints, the input of stage 2
    shapes_records: int = 320
    fact_records: int = 160
    arithmetic_records: int = 160
    planted_share: float = 0.03  # of every source: wrong answers, and as many empty answers
    leaks_exact: int = 3
    leaks_reencoded: int = 3
    eval_lesion: tuple[int, int, int, int] = (48, 48, 24, 32)  # mcq, yesno, open, det
    eval_shapes: int = 32


QUICK = replace(DemoConfig(), lesion_records=1600, adversarial_records=800, shapes_records=160,
                fact_records=80, arithmetic_records=80, eval_lesion=(24, 24, 12, 16), eval_shapes=16)
EVAL_COLUMNS = ["index", "question", "image", *LETTERS, "answer", "category", "task", "kind"]


@dataclass
class DemoData:
    """What `write_demo_data` wrote, and what it planted where."""

    root: Path
    train: Path  # stage-1 training records, planted faults included
    adversarial: Path  # clean lesion records for stage 2 (`aloe adv-train -i`)
    eval_med: Path
    eval_general: Path
    planted: dict[str, list[str]]  # wrong_answer / empty_answer / eval_leak -> record ids
    counts: dict[str, int]


def _rng(seed: int, part: str) -> np.random.Generator:
    """An independent stream per part, so resizing one part leaves the others unchanged."""
    return np.random.default_rng([seed, *part.encode()])


def _lesion_kinds(count: int) -> Iterator[str]:
    for i in range(count):
        yield LESION_KINDS[i % len(LESION_KINDS)]


def eval_items(seed: int, config: DemoConfig = DemoConfig()) -> tuple[list[Item], list[Item]]:
    """The medical and the general evaluation items (their images are never used for training)."""
    rng = _rng(seed, "eval-med")
    med = [lesion_item(rng, kind) for kind, n in zip(LESION_KINDS, config.eval_lesion) for _ in range(n)]
    rng = _rng(seed, "eval-general")
    general = [shapes_item(rng, "mcq" if i % 2 == 0 else "open") for i in range(config.eval_shapes)]
    return med, general


def write_eval_tsv(path: Path, items: list[Item]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(EVAL_COLUMNS)
        for index, item in enumerate(items):
            options = [(item.options or {}).get(letter, "") for letter in LETTERS]
            image = base64.b64encode(item.image).decode("ascii") if item.image else ""
            writer.writerow([index, item.question, image, *options, item.answer, item.category, item.task,
                             item.kind])


class _Writer:
    """Writes images under `images/` and collects records, keeping ids unique and counted."""

    def __init__(self, root: Path):
        self.root = root
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.planted: dict[str, list[str]] = {"wrong_answer": [], "empty_answer": [], "eval_leak": []}

    def image(self, name: str, data: bytes) -> str:
        relative = f"images/{name}"
        (self.root / relative).write_bytes(data)
        return relative

    def add(self, item: Item, source: str, number: int, hint: tuple[str, str] | None = None,
            planted: str | None = None, suffix: str = "png") -> dict:
        record_id = f"{source}-{number:05d}"
        image = self.image(f"{record_id}.{suffix}", item.image) if item.image is not None else None
        record = to_record(item, record_id, source, image, hint)
        if planted is not None:
            record["meta"]["planted"] = planted
            self.planted[planted].append(record_id)
        self.records.append(record)
        return record


def _plant_faults(rng: np.random.Generator, writer: _Writer, item: Item, source: str, number: int,
                  share: float) -> bool:
    """With probability 2 x share, write `item` with a wrong or an empty answer instead."""
    draw = rng.random()
    if draw < share:
        answer, truth = wrong_answer(rng, item)
        writer.add(replace(item, answer=answer, truth=truth), source, number, planted="wrong_answer")
    elif draw < 2 * share:
        writer.add(replace(item, answer="", truth=""), source, number, planted="empty_answer")
    else:
        return False
    return True


def write_demo_data(out_dir: str | Path, seed: int = 0, config: DemoConfig = DemoConfig()) -> DemoData:
    """Write train.jsonl, adversarial.jsonl, demo-med.tsv, demo-general.tsv and images/ into `out_dir`."""
    root = Path(out_dir)
    writer = _Writer(root)
    rng = _rng(seed, "lesion-vqa")
    for number, kind in enumerate(_lesion_kinds(config.lesion_records)):
        item = lesion_item(rng, kind)
        if _plant_faults(rng, writer, item, "lesion-vqa", number, config.planted_share):
            continue
        hint = None
        if rng.random() < config.hint_share:
            hint = (str(rng.choice(list(HINT_FORMS))), item.truth)
        writer.add(item, "lesion-vqa", number, hint)
    makers = {"shapes-vqa": (config.shapes_records, lambda r, i: shapes_item(r, "mcq" if i % 2 == 0 else "open")),
              "med-facts": (config.fact_records, lambda r, i: fact_item(r)),
              "arithmetic": (config.arithmetic_records, lambda r, i: arithmetic_item(r))}
    for source, (count, make) in makers.items():
        rng = _rng(seed, source)
        for number in range(count):
            item = make(rng, number)
            if not _plant_faults(rng, writer, item, source, number, config.planted_share):
                writer.add(item, source, number)

    med, general = eval_items(seed, config)
    rng = _rng(seed, "leaks")
    leaked = rng.permutation(len(med))
    exact, reencoded, number = 0, 0, 90000  # leak ids stand apart from the ordinary records
    for index in leaked:
        if exact == config.leaks_exact and reencoded == config.leaks_reencoded:
            break
        item = replace(med[int(index)], meta={**med[int(index)].meta, "leak_of": int(index)})
        if exact < config.leaks_exact:
            record = writer.add(item, "lesion-vqa", number, planted="eval_leak")
            record["meta"]["copy"] = "exact"
            exact += 1
        else:
            data = hash_preserving_jpeg(item.image)
            if data is None:
                continue
            record = writer.add(replace(item, image=data), "lesion-vqa", number, planted="eval_leak", suffix="jpg")
            record["meta"]["copy"] = "reencoded"
            reencoded += 1
        number += 1

    order = _rng(seed, "order").permutation(len(writer.records))
    train = root / "train.jsonl"
    _write_jsonl(train, [writer.records[i] for i in order])

    adversarial_writer = _Writer(root)
    rng = _rng(seed, "adversarial")
    for number, kind in enumerate(_lesion_kinds(config.adversarial_records)):
        adversarial_writer.add(lesion_item(rng, kind), "lesion-vqa", 50000 + number)
    adversarial = root / "adversarial.jsonl"
    _write_jsonl(adversarial, adversarial_writer.records)

    eval_med, eval_general = root / "demo-med.tsv", root / "demo-general.tsv"
    write_eval_tsv(eval_med, med)
    write_eval_tsv(eval_general, general)
    counts = {"train": len(writer.records), "adversarial": len(adversarial_writer.records),
              "eval_med": len(med), "eval_general": len(general)}
    return DemoData(root, train, adversarial, eval_med, eval_general, writer.planted, counts)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(json.dumps(record) + "\n" for record in records))
    temporary.replace(path)
