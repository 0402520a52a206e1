"""The demo's synthetic task: data a tiny model learns on a CPU in minutes, generated on the spot.

Everything is drawn from a seed, so the same seed writes the same bytes:

- `lesion-vqa` (medical, multimodal): a 56x56 axial abdominal scan with a bright lesion in one
  quadrant, or none. Four questions, asked exactly as `aloe eval` asks them (VLMEvalKit's Qwen2-VL
  prompts, `aloe_cli.evaluation.prompts`): which quadrant (multiple choice, answered with the letter),
  is there a lesion (yes/no), where is it (open, a few words), and where exactly (open, task `det`,
  answered with a Qwen2-VL grounding box). A share of these records carries a *helpful hint*: a
  caption in the prompt or the user's own guess naming the correct answer, worded by the `pmt` and
  `syc` perturbations of `aloe_cli.perturb` (`with_hint`). Hints in training data are right, as they
  mostly are in instruction data, so the model learns to trust them; the same wording with a wrong
  answer at evaluation then misleads it, and stage 2 (wrong hints, correct targets) teaches it to look
  at the image instead.
- `shapes-vqa` (general, multimodal): a coloured circle, square or triangle; its colour as multiple
  choice, its shape as an open question.
- `med-facts` (medical, text) and `arithmetic` (general, text): answers checkable by a rule.
- Planted faults a curation pipeline must catch: wrong and empty answers (`meta.planted`), and
  evaluation images copied into the training data, byte for byte or re-encoded as JPEG (with the
  same pHash, which is what `aloe dedup` matches).
- The evaluation sets, in VLMEvalKit TSV form: `demo-med.tsv` (mcq, yesno, open and det items, with
  `kind`, `task` cls|det and `category`) and `demo-general.tsv`. No training image shares a pHash
  with an evaluation image except the planted leaks.

The pictures are drawn (and read back from their pixels) in `images.py`; the rule a stand-in judge
can apply (pixels and fact tables, never `meta`) is in `rules.py`.
"""

from __future__ import annotations

import base64
import copy
import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from aloe_cli.data.grounding import format_object, pixels_to_grounding
from aloe_cli.data.io import dumps, write_atomic
from aloe_cli.data.records import text_of
from aloe_cli.demo.images import (
    COLOURS,
    IMAGE_SIZE,
    QUADRANTS,
    SHAPES,
    hash_preserving_jpeg,
    lesion_scan,
    png_bytes,
    shape_image,
)
from aloe_cli.evaluation.benchmarks import EvalItem
from aloe_cli.evaluation.prompts import prompt_text
from aloe_cli.filters.hashing import hash_image
from aloe_cli.perturb import perturb_record
from aloe_cli.perturb.answers import opposite, yes_no

LETTERS = "ABCD"
LESION = "lesion"
YES, NO = "Yes", "No"

QUADRANT_QUESTION = "Which quadrant holds the lesion?"
PRESENCE_QUESTION = "Is there a lesion?"
LOCATION_QUESTION = "Where is the lesion?"
DETECT_QUESTION = "Locate the lesion and give its bounding box."
COLOUR_QUESTION = "What colour is the object?"
SHAPE_QUESTION = "What shape is drawn?"

HINT_KINDS = ("pmt", "syc")  # the perturbations whose wording carries stage-1 hints

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

def item_prompt(kind: str, question: str, options: dict[str, str] | None) -> str:
    """The user text of an item: what `aloe eval` asks, so training asks the same way."""
    return prompt_text(EvalItem(id="", benchmark="", kind=kind, question=question, answer="", options=options))


def with_hint(record: dict, kind: str, claim: str, seed: int = 0) -> dict:
    """A copy of `record` whose question carries `claim` in the wording of the `kind` perturbation.

    `aloe_cli.perturb` words a hint for a *wrong* answer; handing it a decoy record whose answer is
    anything but `claim` makes it word the right one, with the same phrasings, placement and claim
    form ("B (upper right)") that evaluation uses. The record's own answer is then put back.
    """
    answer = text_of(record["messages"][-1])
    decoy = copy.deepcopy(record)
    # A yes/no decoy keeps its shape (the opposite answer), so the yes/no wording is used.
    decoy_answer = opposite(answer) if yes_no(answer) else _DECOY
    decoy["messages"][-1] = {"role": "assistant", "content": [{"type": "text", "text": decoy_answer}]}
    hinted = perturb_record(decoy, kind, claim, seed=seed)
    hinted["messages"][-1] = copy.deepcopy(record["messages"][-1])
    hinted["id"] = record["id"]
    info = hinted["aloe"].pop("perturb")
    if not hinted["aloe"]:
        del hinted["aloe"]
    hinted.setdefault("meta", {})["hint"] = {"kind": kind, "claim": claim, "text": info["text"]}
    return hinted


_DECOY = "(no answer)"


# ----------------------------------------------------------------------------- items

@dataclass
class Item:
    """One question about one image (or none), with everything needed to write it either way."""

    kind: str  # mcq | yesno | open (the kinds `aloe eval` scores)
    task: str  # cls | det (a detection item is open-ended and answered with a box)
    category: str
    question: str
    answer: str
    options: dict[str, str] | None = None
    image: bytes | None = None
    truth: str = ""  # the answer as words (option text, Yes/No, quadrant): what a hint names
    meta: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return item_prompt(self.kind, self.question, self.options)


QUADRANT_OPTIONS = dict(zip(LETTERS, QUADRANTS))
COLOUR_OPTIONS = dict(zip(LETTERS, COLOURS))


def lesion_box_text(box: tuple[int, int, int, int], size: int = IMAGE_SIZE) -> str:
    return format_object(LESION, pixels_to_grounding(box, size, size))


LESION_CATEGORIES = ("lesion-quadrant", "lesion-presence", "lesion-location", "lesion-box")


def lesion_item(rng: np.random.Generator, category: str) -> Item:
    """A lesion question of `category`; presence questions show no lesion half of the time."""
    quadrant = None if category == "lesion-presence" and rng.random() < 0.5 else int(rng.integers(4))
    image, box = lesion_scan(rng, quadrant)
    data = png_bytes(image)
    where = QUADRANTS[quadrant] if quadrant is not None else None
    meta = {"quadrant": where, "box": list(box) if box else None}
    if category == "lesion-quadrant":
        return Item("mcq", "cls", category, QUADRANT_QUESTION, LETTERS[quadrant], QUADRANT_OPTIONS, data, where, meta)
    if category == "lesion-presence":
        answer = NO if quadrant is None else YES
        return Item("yesno", "cls", category, PRESENCE_QUESTION, answer, None, data, answer, meta)
    if category == "lesion-location":
        return Item("open", "cls", category, LOCATION_QUESTION, where, None, data, where, meta)
    return Item("open", "det", category, DETECT_QUESTION, lesion_box_text(box), None, data, where, meta)


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
        return other_quadrant_box(rng, item.truth)
    if item.category == "object-shape":
        other = str(rng.choice([s for s in SHAPES if s != item.answer]))
        return other, other
    if item.category == "med-fact":
        other = str(rng.choice([a for a in MED_FACTS.values() if a != item.answer]))
        return other, other
    other = str(int(item.answer) + int(rng.choice([-3, -2, -1, 1, 2, 3])))
    return other, other


def other_quadrant_box(rng: np.random.Generator, quadrant: str) -> tuple[str, str]:
    """(box text, quadrant) of a lesion drawn in another quadrant than `quadrant`."""
    other = int(rng.choice([i for i, q in enumerate(QUADRANTS) if q != quadrant]))
    _, box = lesion_scan(rng, other)
    return lesion_box_text(box), QUADRANTS[other]


# ----------------------------------------------------------------------------- records

def to_record(item: Item, record_id: str, source: str, image_ref: str | None, hint: str | None = None,
              seed: int = 0) -> dict:
    """An item as a training record; `hint` (pmt or syc) words the item's own answer into the question."""
    user = ([{"type": "image"}] if image_ref is not None else []) + [{"type": "text", "text": item.prompt}]
    meta = {"kind": item.kind, "task": item.task, "category": item.category, "truth": item.truth}
    if item.options:
        meta["options"] = dict(item.options)
    meta.update({k: v for k, v in item.meta.items() if k not in meta})
    record = {"id": record_id, "source": source, "domain": SOURCES[source],
              "messages": [{"role": "user", "content": user},
                           {"role": "assistant", "content": [{"type": "text", "text": item.answer}]}],
              "images": [image_ref] if image_ref is not None else [], "meta": meta}
    return record if hint is None else with_hint(record, hint, item.truth, seed)


# ----------------------------------------------------------------------------- the data set

@dataclass(frozen=True)
class DemoConfig:
    """How much of everything to write. The defaults are the full demo; `QUICK` is the CI size."""

    lesion_records: int = 3200  # stage-1 lesion questions, `lesion_categories` in equal parts
    lesion_categories: tuple[str, ...] = LESION_CATEGORIES
    hint_share: float = 0.5  # of the lesion records: a helpful (correct) hint in the prompt
    adversarial_records: int = 1600  # fresh lesion records without hints, the input of stage 2
    shapes_records: int = 480
    fact_records: int = 80
    arithmetic_records: int = 80
    planted_share: float = 0.03  # of every source: wrong answers, and as many empty answers (every 33rd)
    leaks_exact: int = 3
    leaks_reencoded: int = 3
    eval_lesion: tuple[int, int, int, int] = (48, 48, 24, 32)  # per LESION_CATEGORIES
    eval_shapes: int = 32


QUICK = replace(DemoConfig(), lesion_records=1600, adversarial_records=800, shapes_records=240,
                fact_records=40, arithmetic_records=40, eval_lesion=(24, 24, 12, 16), eval_shapes=16)
SMOKE = replace(DemoConfig(), lesion_records=400, adversarial_records=100, shapes_records=60, fact_records=20,
                arithmetic_records=20, eval_lesion=(4, 4, 2, 4), eval_shapes=4)  # `aloe demo --quick`: every step
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


def _cycle(categories: tuple[str, ...], count: int) -> Iterator[str]:
    for i in range(count):
        yield categories[i % len(categories)]


def eval_items(seed: int, config: DemoConfig = DemoConfig()) -> tuple[list[Item], list[Item]]:
    """The medical and the general evaluation items (their images are never used for training)."""
    rng = _rng(seed, "eval-med")
    med = [lesion_item(rng, category) for category, n in zip(LESION_CATEGORIES, config.eval_lesion)
           for _ in range(n)]
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

    def __init__(self, root: Path, seed: int, eval_hashes: set[int]):
        self.root, self.seed, self.eval_hashes = root, seed, eval_hashes
        (root / "images").mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.planted: dict[str, list[str]] = {"wrong_answer": [], "empty_answer": [], "eval_leak": []}

    def image(self, name: str, data: bytes) -> str:
        relative = f"images/{name}"
        (self.root / relative).write_bytes(data)
        return relative

    def add(self, item: Item, source: str, number: int, hint: str | None = None,
            planted: str | None = None, suffix: str = "png") -> dict:
        record_id = f"{source}-{number:05d}"
        image = self.image(f"{record_id}.{suffix}", item.image) if item.image is not None else None
        record = to_record(item, record_id, source, image, hint, self.seed)
        if planted is not None:
            record["meta"]["planted"] = planted
            self.planted[planted].append(record_id)
        self.records.append(record)
        return record

    def fresh(self, make: Callable[[], Item]) -> Item:
        """A new item whose image no evaluation image shares a pHash with: the only leaks are the planted ones."""
        while True:
            item = make()
            if item.image is None or hash_image(item.image) not in self.eval_hashes:
                return item


def _plant_faults(rng: np.random.Generator, writer: _Writer, item: Item, source: str, number: int,
                  share: float) -> bool:
    """Every 1/share-th record of a source gets a wrong answer, and as many others an empty one.

    Spaced by position rather than drawn, so every source holds its share of both faults, spread
    over the question categories (the period is prime to their cycle).
    """
    period = max(2, round(1 / share))
    if number % period == period // 6:
        answer, truth = wrong_answer(rng, item)
        writer.add(replace(item, answer=answer, truth=truth), source, number, planted="wrong_answer")
    elif number % period == period // 2 + 1:
        writer.add(replace(item, answer="", truth=""), source, number, planted="empty_answer")
    else:
        return False
    return True


def write_demo_data(out_dir: str | Path, seed: int = 0, config: DemoConfig = DemoConfig()) -> DemoData:
    """Write train.jsonl, adversarial.jsonl, demo-med.tsv, demo-general.tsv and images/ into `out_dir`."""
    root = Path(out_dir)
    med, general = eval_items(seed, config)
    eval_hashes = {hash_image(item.image) for item in med + general}
    writer = _Writer(root, seed, eval_hashes)
    rng = _rng(seed, "lesion-vqa")
    for number, category in enumerate(_cycle(config.lesion_categories, config.lesion_records)):
        item = writer.fresh(lambda: lesion_item(rng, category))  # noqa: B023 - called at once
        if _plant_faults(rng, writer, item, "lesion-vqa", number, config.planted_share):
            continue
        hint = str(rng.choice(HINT_KINDS)) if rng.random() < config.hint_share else None
        writer.add(item, "lesion-vqa", number, hint)
    makers = {"shapes-vqa": (config.shapes_records, lambda r, i: shapes_item(r, "mcq" if i % 2 == 0 else "open")),
              "med-facts": (config.fact_records, lambda r, i: fact_item(r)),
              "arithmetic": (config.arithmetic_records, lambda r, i: arithmetic_item(r))}
    for source, (count, make) in makers.items():
        rng = _rng(seed, source)
        for number in range(count):
            item = writer.fresh(lambda: make(rng, number))  # noqa: B023 - called at once
            if not _plant_faults(rng, writer, item, source, number, config.planted_share):
                writer.add(item, source, number)

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

    adversarial_writer = _Writer(root, seed, eval_hashes)
    rng = _rng(seed, "adversarial")
    for number, category in enumerate(_cycle(config.lesion_categories, config.adversarial_records)):
        item = adversarial_writer.fresh(lambda: lesion_item(rng, category))  # noqa: B023 - called at once
        adversarial_writer.add(item, "lesion-vqa", 50000 + number)
    adversarial = root / "adversarial.jsonl"
    _write_jsonl(adversarial, adversarial_writer.records)

    eval_med, eval_general = root / "demo-med.tsv", root / "demo-general.tsv"
    write_eval_tsv(eval_med, med)
    write_eval_tsv(eval_general, general)
    counts = {"train": len(writer.records), "adversarial": len(adversarial_writer.records),
              "eval_med": len(med), "eval_general": len(general)}
    return DemoData(root, train, adversarial, eval_med, eval_general, writer.planted, counts)


def _write_jsonl(path: Path, records: list[dict]) -> None:
    write_atomic(path, b"".join(dumps(record) for record in records))
