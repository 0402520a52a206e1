"""`aloe sample-data`: a small training set and a VLMEvalKit-style benchmark with planted leaks.

Images are synthesised (scan-like blobs and shapes) so the demo needs no
download. Some benchmark rows reuse training images byte-for-byte (exact
leaks) and one reuses a training image re-encoded at another JPEG quality
(a near-duplicate that `--max-distance` catches). A few training records are
grounding data: `objects` with pixel boxes around a drawn lesion, which every
command turns into Qwen2-VL box text on read.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from aloe_cli.demo.images import jpeg_bytes, synthetic_scan
from aloe_cli.errors import AloeError

# (source, domain, multimodal, count)
SOURCES = [
    ("rad-vqa", "medical", True, 16),
    ("path-vqa", "medical", True, 10),
    ("med-text", "medical", False, 10),
    ("general-vqa", "general", True, 8),
    ("general-text", "general", False, 8),
]
ORGANS = ["liver", "left lung", "right kidney", "spleen", "heart", "brain", "pancreas", "bladder"]
FINDINGS = ["a hypodense lesion", "no abnormality", "a small nodule", "mild effusion", "a calcification",
            "an enlarged contour", "a fluid collection", "normal appearance"]
GENERAL_OBJECTS = ["a red circle", "two blue squares", "a green triangle", "a yellow stripe"]
EXACT_LEAKS = 4
GROUNDING_SOURCE, GROUNDING_COUNT = "rad-grounding", 4


@dataclass
class SampleData:
    train: Path
    eval_tsv: Path
    leaked_ids: list[str]
    near_duplicate_id: str
    repeated_id: str  # a later record repeats this record's image
    grounding_ids: list[str]  # records with `objects` (pixel boxes)


def _near_duplicate(image: Image.Image) -> bytes:
    """A slightly rotated or cropped, re-encoded copy whose pHash differs by 1-4 bits.

    pHash shrugs off plain re-encoding (distance 0), so the edit grows until the
    copy is a true near-duplicate: missed by exact matching, caught by a small
    --max-distance.
    """
    import imagehash

    original = imagehash.phash(image)
    size = image.width
    edits = [lambda im, a=a / 2: im.rotate(a) for a in range(1, 16)]
    edits += [lambda im, m=m: im.crop((m, m, size - m, size - m)).resize(im.size) for m in range(1, size // 8)]
    for edit in edits:
        data = jpeg_bytes(edit(image), quality=60)
        if 1 <= imagehash.phash(Image.open(io.BytesIO(data))) - original <= 4:
            return data
    raise RuntimeError("no near-duplicate edit found")


def _record(rng: np.random.Generator, source: str, domain: str, number: int, image: str | None) -> dict:
    if domain == "medical":
        organ, finding = ORGANS[rng.integers(len(ORGANS))], FINDINGS[rng.integers(len(FINDINGS))]
        question = (f"What does the image show in the {organ}?" if image else
                    f"What is the usual cause of {finding} in the {organ}?")
        answer = (f"The {organ} shows {finding}." if image else
                  f"{finding.capitalize()} in the {organ} has several causes; imaging and history narrow them down.")
    else:
        thing = GENERAL_OBJECTS[rng.integers(len(GENERAL_OBJECTS))]
        question = "What shapes are in the picture?" if image else f"Describe {thing} in one sentence."
        answer = f"There is {thing}." if image else f"It is {thing}, a simple geometric figure."
    user = ([{"type": "image"}] if image else []) + [{"type": "text", "text": question}]
    return {"id": f"{source}-{number:04d}", "source": source, "domain": domain,
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
            "images": [image] if image else []}


def _grounding_record(rng: np.random.Generator, number: int, out: Path) -> dict:
    """A scan with one or two bright lesions drawn in, boxed in pixels under `objects`.

    Even-numbered records have an answer the boxes are appended to; odd ones
    only ask, so grounding adds the assistant turn.
    """
    image = synthetic_scan(rng)
    draw = ImageDraw.Draw(image)
    objects = []
    for _ in range(1 + number % 2):
        x0, y0 = (int(v) for v in rng.integers(10, image.width - 80, 2))
        w, h = (int(v) for v in rng.integers(20, 60, 2))
        draw.ellipse([x0, y0, x0 + w, y0 + h], fill=250)
        objects.append({"bbox": [x0, y0, x0 + w, y0 + h], "label": "lesion", "image": 0})
    record_id = f"{GROUNDING_SOURCE}-{number:04d}"
    image_rel = f"images/{record_id}.jpg"
    (out / image_rel).write_bytes(jpeg_bytes(image, 90))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Locate every lesion."}]}]
    if number % 2 == 0:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": "There is one lesion."}]})
    return {"id": record_id, "source": GROUNDING_SOURCE, "domain": "medical", "messages": messages,
            "images": [image_rel], "objects": objects}


# What write_sample_data puts in its folder (images/ holds only files it names itself).
SAMPLE_FILES = ("train.jsonl", "eval.tsv", "images")


def check_sample_folder(out_dir: str | Path, *, force: bool = False) -> None:
    """Refuse a folder that already holds demo files (unless `force`), a file in the folder's place,
    and a folder that cannot be written; before anything is written."""
    from aloe_cli.data.destinations import Named, check_writable

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise AloeError(f"{out} is a file; name a folder to write the sample data into")
    present = [name for name in SAMPLE_FILES if (out / name).exists()]
    if present and not force:
        raise AloeError(f"{out} already holds {', '.join(present)}: pass --force to overwrite them, "
                        "or name another folder")
    if out.is_dir():
        check_writable(Named("sample-data", str(out / SAMPLE_FILES[0])))


def write_sample_data(out_dir: str | Path, seed: int = 0) -> SampleData:
    """Write the demo data into `out_dir` (created if needed). Everything is written into a hidden
    folder inside it first and moved into place at the end, so a failed run (a full disk, SIGTERM)
    leaves no partial data set behind."""
    out = Path(out_dir)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".aloe-sample-", dir=out))
    except OSError as exc:
        raise AloeError(f"cannot write the sample data into {out}: {exc.strerror or exc}") from None
    try:
        data = _write_sample_data(staging, seed)
        (out / "images").mkdir(exist_ok=True)
        for image in sorted((staging / "images").iterdir()):
            os.replace(image, out / "images" / image.name)
        for name in ("eval.tsv", "train.jsonl"):  # train.jsonl last: it is what users look for
            os.replace(staging / name, out / name)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if nothing else landed there
        if isinstance(exc, OSError):
            raise AloeError(f"cannot write the sample data into {out}: {exc.strerror or exc}") from None
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return replace(data, train=out / data.train.name, eval_tsv=out / data.eval_tsv.name)


def _write_sample_data(out: Path, seed: int) -> SampleData:
    (out / "images").mkdir()
    rng = np.random.default_rng(seed)
    records, train_images = [], []
    for source, domain, multimodal, count in SOURCES:
        for number in range(count):
            image_rel = None
            if multimodal:
                image = synthetic_scan(rng, color=domain == "general")
                image_rel = f"images/{source}-{number:04d}.jpg"
                data = jpeg_bytes(image, 90)
                (out / image_rel).write_bytes(data)
                train_images.append((f"{source}-{number:04d}", image, data))
            records.append(_record(rng, source, domain, number, image_rel))
    # One training image repeated under another name: what `--within` removes.
    repeat_id, _, repeat_data = train_images[0]
    (out / "images" / "repeat-0000.jpg").write_bytes(repeat_data)
    repeat = _record(rng, "rad-vqa", "medical", 9999, "images/repeat-0000.jpg")
    records.append(repeat)
    # Grounding records draw from their own generator: the rest of the data stays as it was without them.
    grounding_rng = np.random.default_rng([seed, 1])
    grounding = [_grounding_record(grounding_rng, number, out) for number in range(GROUNDING_COUNT)]
    records.extend(grounding)
    train = out / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")

    # Benchmark: unrelated images, exact copies of some training images, one re-encoded copy,
    # and a row that refers to another row's image by index (as VLMEvalKit files do).
    leaked = [train_images[i] for i in 1 + rng.choice(len(train_images) - 1, EXACT_LEAKS + 1, replace=False)]
    rows = []
    for index in range(8):
        rows.append((index, jpeg_bytes(synthetic_scan(rng), 90), None))
    for offset, (train_id, _, data) in enumerate(leaked[:EXACT_LEAKS]):
        rows.append((100 + offset, data, train_id))
    near_id, near_image, _ = leaked[EXACT_LEAKS]
    rows.append((200, _near_duplicate(near_image), near_id))
    eval_tsv = out / "eval.tsv"
    handle = io.StringIO(newline="")
    writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
    writer.writerow(["index", "image", "question", "A", "B", "answer", "category"])
    for index, data, _ in rows:
        writer.writerow([index, base64.b64encode(data).decode(), "Is there an abnormality?", "yes", "no", "A",
                         "abnormality"])
    writer.writerow([300, "0", "Which side is affected?", "left", "right", "B", "laterality"])
    eval_tsv.write_text(handle.getvalue(), encoding="utf-8")
    return SampleData(train, eval_tsv, [r[0] for r in leaked[:EXACT_LEAKS]], near_id, repeat_id,
                      [r["id"] for r in grounding])
