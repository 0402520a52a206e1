"""Shared by the record- and privacy-level reliability tests: DICOM files with patient markers, the four
data commands as the CLI runs them, and a search for the markers in everything a run leaves behind."""

from __future__ import annotations

import base64
import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pydicom
import pydicom.data
from PIL import Image

from support import aloe, chat, read_jsonl

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
COMMANDS = ("dedup", "score", "perplexity", "mix")
# Patient data written into the headers of pydicom's test files: none of it may leave a run by default.
PATIENT = {"PatientName": "Qzxwv^Jklmnop", "PatientID": "PID-7QX3Z9W", "PatientBirthDate": "19020304"}
MARKERS = [value.encode() for value in PATIENT.values()]
_BASE64_RUN = re.compile(rb"[A-Za-z0-9+/]{40,}={0,2}")


def dicom_bytes(name: str, **tags: str) -> bytes:
    """One of pydicom's bundled test files, with PATIENT (and `tags`) written into its header."""
    dataset = pydicom.dcmread(TEST_FILES / name)
    for key, value in {**PATIENT, **tags}.items():
        setattr(dataset, key, value)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    assert data[128:132] == b"DICM" and all(marker in data for marker in MARKERS)
    return data


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def png_bytes(size: int = 48, shade: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (size, size), shade).save(buffer, format="PNG")
    return buffer.getvalue()


def record(id: str, images: list, answer: str = "A small nodule in the right lower lobe.", **extra) -> dict:
    return chat("What does the scan show?", answer, images, id=id, source="scans", domain="medical", **extra)


def write_parquet(path: Path, rows: list[dict]) -> Path:
    """Rows as HF datasets writes them: images as a list of {bytes, path} structs."""
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    part = pa.struct([("type", pa.string()), ("text", pa.string())])
    message = pa.struct([("role", pa.string()), ("content", pa.list_(part))])
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("domain", pa.string()),
                        ("messages", pa.list_(message)), ("images", pa.list_(image))])
    normalised = [{**row, "messages": [{"role": m["role"], "content": [{"type": c["type"], "text": c.get("text")}
                                                                       for c in m["content"]]}
                                       for m in row["messages"]]} for row in rows]
    pq.write_table(pa.Table.from_pylist(normalised, schema=schema), path)
    return path


def read_records(path: Path) -> list[dict]:
    """Records of a JSONL, JSONL.gz or parquet file (empty when it does not exist)."""
    if not path.exists():
        return []
    if path.suffix == ".parquet":
        return pq.read_table(path).to_pylist()
    if path.suffix == ".gz":
        return read_jsonl(gzip.decompress(path.read_bytes()).decode())
    return read_jsonl(path)


def markers_in(data: bytes) -> list[bytes]:
    """The markers found in `data` as it is, or inside any base64 it holds (data URIs, JSON-escaped or not)."""
    found = {marker for marker in MARKERS if marker in data}
    for run in _BASE64_RUN.finditer(data.replace(b"\\/", b"/")):
        chunk = run.group(0)
        decoded = base64.b64decode(chunk[: len(chunk) - len(chunk) % 4])
        found.update(marker for marker in MARKERS if marker in decoded)
    return sorted(found)


def markers_in_file(path: Path) -> list[bytes]:
    """Markers in a file: its bytes, decompressed, and every value of a parquet file."""
    data = path.read_bytes()
    found = set(markers_in(data))
    if path.suffix == ".gz":
        found.update(markers_in(gzip.decompress(data)))
    if path.suffix == ".parquet":
        found.update(markers_in(json.dumps(pq.read_table(path).to_pylist(), default=_bytes_as_base64).encode()))
    return sorted(found)


def _bytes_as_base64(value):
    return base64.b64encode(value).decode() if isinstance(value, bytes) else str(value)


def image_of(entry) -> Image.Image:
    """An output image entry (data URI or parquet struct) decoded by Pillow."""
    data = entry["bytes"] if isinstance(entry, dict) else base64.b64decode(entry.partition(",")[2])
    return Image.open(io.BytesIO(data))


@dataclass
class Run:
    """One CLI run of a data command, with the files it was told to write."""

    command: str
    result: object
    output: Path
    rejects: Path
    report: Path
    extra_files: list[Path] = field(default_factory=list)

    @property
    def summary(self) -> dict:
        return json.loads(self.report.read_text())

    def files(self) -> list[Path]:
        return [path for path in (self.output, self.rejects, self.report, *self.extra_files) if path.exists()]


def command_args(command: str, workdir: Path, *, judge_url: str | None, model: Path | None) -> tuple[list, list]:
    """(the command's own arguments, the files it writes besides output, rejects and report)."""
    if command == "dedup":
        return ["dedup", "--within"], []
    if command == "score":
        cache = workdir / "judge-cache.jsonl"
        return ["score", "--judge", "fake-judge", "--backend", "openai", "--base-url", judge_url,
                "--max-retries", "0", "--cache", str(cache)], [cache]
    if command == "perplexity":
        return ["perplexity", "--model", str(model), "--device", "cpu"], []
    if command == "mix":
        cache = workdir / "tokens.sqlite"
        return ["mix", "--tokenizer", str(model), "--share", "medical/multimodal=1", "--cache", str(cache)], [cache]
    raise ValueError(command)


def run_command(command: str, inputs: list[Path], workdir: Path, *extra: str, judge_url: str | None = None,
                model: Path | None = None, output_name: str = "out.jsonl", rejects_name: str = "rejects.jsonl",
                on_error: str = "skip") -> Run:
    workdir.mkdir(parents=True, exist_ok=True)
    args, files = command_args(command, workdir, judge_url=judge_url, model=model)
    output, rejects, report = workdir / output_name, workdir / rejects_name, workdir / "report.json"
    for path in inputs:
        args += ["-i", str(path)]
    args += ["-o", str(output), "--rejects", str(rejects), "--report", str(report), "--on-error", on_error, *extra]
    return Run(command, aloe(*args, timeout=300), output, rejects, report, files)
