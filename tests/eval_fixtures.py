"""Small benchmark files for the evaluation tests: VLMEvalKit TSV and JSONL items, with real images."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

from PIL import Image

from support import scan


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, delimiter="\t")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: row.get(key, "") for key in columns})
    return path


def write_items(path: Path, items: list[dict]) -> Path:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path


ORGANS = ["Liver", "Spleen", "Kidney", "Lung"]


def mcq_tsv(path: Path, count: int = 6) -> Path:
    """Four options, answers cycling A..D, a category and l2-category, base64 images."""
    rows = []
    for index in range(count):
        rows.append({"index": str(index), "question": f"Which organ is shown in scan {index}?",
                     "A": ORGANS[0], "B": ORGANS[1], "C": ORGANS[2], "D": ORGANS[3],
                     "answer": "ABCD"[index % 4], "category": "abdomen" if index % 2 else "chest",
                     "l2-category": "organ", "image": png_base64(scan(index, size=64))})
    return write_tsv(path, rows)


def yesno_tsv(path: Path, count: int = 4) -> Path:
    rows = [{"index": str(index), "question": f"Is there a lesion in scan {index}?",
             "answer": "Yes" if index % 2 == 0 else "No", "category": "lesion",
             "image": png_base64(scan(100 + index, size=64))} for index in range(count)]
    return write_tsv(path, rows)


def image_files(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for index in range(count):
        name = f"img{index}.png"
        scan(200 + index, size=64).save(folder / name)
        names.append(f"images/{name}")
    return names


def paired_jsonl(path: Path, pairs: int = 3) -> Path:
    """ProbMed-style: each pair is a question and its adversarial twin (yes, then no)."""
    images = image_files(path.parent / "images", pairs)
    items = []
    for index in range(pairs):
        items.append({"id": f"p{index}a", "question": "Is this a CT scan?", "answer": "yes", "kind": "yesno",
                      "images": [images[index]], "pair_id": f"p{index}", "category": "modality"})
        items.append({"id": f"p{index}b", "question": "Is this an MRI scan?", "answer": "no", "kind": "yesno",
                      "images": [images[index]], "pair_id": f"p{index}", "category": "modality"})
    return write_items(path, items)


def open_jsonl(path: Path, count: int = 3) -> Path:
    images = image_files(path.parent / "images", count)
    items = [{"id": f"o{index}", "question": "Which organ is abnormal?", "answer": f"The {ORGANS[index % 4].lower()}",
              "images": [images[index]], "category": "organ"} for index in range(count)]
    return write_items(path, items)


def text_jsonl(path: Path, count: int = 4) -> Path:
    """Text-only multiple choice with options given as a list."""
    items = [{"id": f"t{index}", "question": f"Which vitamin deficiency causes condition {index}?",
              "options": ["Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"], "answer": "ABCD"[index % 4],
              "kind": "mcq", "category": "nutrition"} for index in range(count)]
    return write_items(path, items)


def adversarial_jsonl(path: Path, count: int = 4) -> Path:
    """Classification and detection items with images, for --perturb."""
    images = image_files(path.parent / "images", count)
    items = [{"id": f"a{index}", "question": "What does the image show?",
              "options": {"A": "Pneumonia", "B": "Normal", "C": "Nodule"}, "answer": "ABC"[index % 3],
              "images": [images[index]], "task": "cls" if index % 2 == 0 else "det"} for index in range(count)]
    return write_items(path, items)
