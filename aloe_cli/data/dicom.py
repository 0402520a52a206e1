"""DICOM: recognising it, rendering its pixels, and keeping its header out of everything aloe writes.

A DICOM file is recognised by its `DICM` magic at byte 128, whatever its name
or the MIME type of the data URI that holds it. Only pixel-related tags are
ever read (`DICOM_PIXEL_TAGS`), so patient data in the header cannot reach a
record, report or log through us. Embedded DICOM data (bytes, image structs,
data URIs) does carry that header: normalisation on read replaces it with its
rendered pixels (`images.without_dicom_header`), and a record that failed
before that is scrubbed (`scrub_embedded_dicom`) before it goes to the rejects.

Problems are `RecordError`s with their own reasons: `dicom_no_pixel_data`
(a report, plan or other non-image object), `dicom_decoder_missing` (a
compressed transfer syntax no installed plugin reads; the message names the
package to install), `dicom_decode_failed` (the installed plugins failed).
Messages never quote a decoder's exception text, which could hold header values.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from aloe_cli.errors import RecordError

# Tags needed to turn DICOM pixel data into an image, and nothing else.
DICOM_PIXEL_TAGS = [
    "PixelData", "FloatPixelData", "DoubleFloatPixelData", "Rows", "Columns", "BitsAllocated", "BitsStored",
    "HighBit", "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation", "PlanarConfiguration",
    "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction", "PixelPaddingValue",
    "RedPaletteColorLookupTableDescriptor", "GreenPaletteColorLookupTableDescriptor",
    "BluePaletteColorLookupTableDescriptor", "RedPaletteColorLookupTableData",
    "GreenPaletteColorLookupTableData", "BluePaletteColorLookupTableData",
    "SegmentedRedPaletteColorLookupTableData", "SegmentedGreenPaletteColorLookupTableData",
    "SegmentedBluePaletteColorLookupTableData", "ExtendedOffsetTable", "ExtendedOffsetTableLengths",
]
_PIXEL_DATA_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
_MAGIC_OFFSET = 128
HEAD_BYTES = _MAGIC_OFFSET + 4  # enough of a file to tell whether it is DICOM
_HEAD_CHARS = 176  # base64 characters that encode HEAD_BYTES
# What replaces embedded DICOM data in a record that failed before its pixels could be re-encoded.
DICOM_REMOVED = "<embedded DICOM data removed: its header may hold patient data; --keep-dicom-bytes keeps it>"
_BASE64_RUN = re.compile(r"[A-Za-z0-9+/\\]{" + str(_HEAD_CHARS) + r",}=*")  # backslash: JSON may escape '/'
# pip names of the packages pydicom's decoder plugins need, where they differ from the import name.
_PIP_NAMES = {"gdcm": "python-gdcm"}


# ----------------------------------------------------------------------------- recognising DICOM

def is_dicom_bytes(data: bytes) -> bool:
    return data[_MAGIC_OFFSET:_MAGIC_OFFSET + 4] == b"DICM"


def file_is_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return is_dicom_bytes(handle.read(HEAD_BYTES))
    except OSError:
        return False


def _base64_head(payload: str) -> bytes:
    """The first bytes that a base64 text encodes (enough for the DICOM magic); b"" if it is not base64."""
    head = re.sub(r"[^A-Za-z0-9+/]", "", payload[:_HEAD_CHARS * 2])[:_HEAD_CHARS]
    try:
        return base64.b64decode(head + "=" * (-len(head) % 4))
    except (binascii.Error, ValueError):
        return b""


def is_embedded_dicom(entry: Any) -> bool:
    """True for DICOM data inside a record: bytes, an image struct's bytes, a data URI (sniffed, or so labelled)."""
    if isinstance(entry, dict):
        entry = entry.get("bytes")
    if isinstance(entry, (bytes, bytearray, memoryview)):
        return is_dicom_bytes(bytes(entry[:HEAD_BYTES]))
    if isinstance(entry, str) and entry.startswith("data:"):
        comma = entry.find(",", 0, 256)  # slices, not a partition: the payload can be megabytes
        if comma < 0:
            return False
        head = entry[comma + 1:comma + 1 + 2 * _HEAD_CHARS]
        return "dicom" in entry[:comma].lower() or is_dicom_bytes(_base64_head(head))
    return False


def scrub_embedded_dicom(value: Any) -> Any:
    """`value` (a raw record, row or line, at any depth) with every piece of embedded DICOM data replaced.

    For records that failed before normalisation re-encoded their images:
    they still go to the rejects, but never with a DICOM header. Strings are
    searched for base64 runs (data URIs, VLMEvalKit columns, a broken JSON
    line) whose first bytes carry the DICOM magic.
    """
    if isinstance(value, dict):
        if is_embedded_dicom(value.get("bytes")):
            return DICOM_REMOVED  # an image struct {bytes, path}: the whole entry
        return {key: scrub_embedded_dicom(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [scrub_embedded_dicom(item) for item in value]
    if isinstance(value, (bytes, bytearray, memoryview)):
        return DICOM_REMOVED if is_embedded_dicom(value) else value
    if isinstance(value, str):
        if value.startswith("data:") and is_embedded_dicom(value):
            return DICOM_REMOVED
        if len(value) >= _HEAD_CHARS:
            return _BASE64_RUN.sub(_scrub_run, value)
    return value


def _scrub_run(match: re.Match) -> str:
    return DICOM_REMOVED if is_dicom_bytes(_base64_head(match.group(0).replace("\\", ""))) else match.group(0)


# ----------------------------------------------------------------------------- reading and rendering

def read_pixel_tags(source: bytes | Path, name: str, **options: Any):
    """The pixel-related tags of a DICOM file (never its patient data); `options` go to pydicom.dcmread."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings can quote element values
            return pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source,
                                   specific_tags=DICOM_PIXEL_TAGS, **options)
    except InvalidDicomError:
        raise RecordError("image_corrupt", f"not a DICOM file: {name}") from None
    except Exception as exc:  # pydicom raises many types for truncated data; its messages may quote values
        raise RecordError("image_corrupt", f"cannot read DICOM file {name}: {type(exc).__name__}") from None


def check_pixels(dataset, name: str) -> None:
    """RecordError for DICOM that holds no image, or whose compression no installed plugin decodes."""
    if not any(tag in dataset for tag in _PIXEL_DATA_TAGS):
        raise RecordError("dicom_no_pixel_data",
                          f"DICOM file {name} holds no pixel data (a report, plan or other non-image object)")
    for tag in ("Rows", "Columns"):
        if tag not in dataset:
            raise RecordError("image_corrupt", f"DICOM file {name} has pixel data but no {tag}")
    syntax = _transfer_syntax(dataset)
    if syntax is None or not syntax.is_compressed:
        return
    from pydicom.pixels import get_decoder

    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise RecordError("dicom_decoder_missing",
                          f"cannot decode the pixel data of DICOM file {name}: pydicom has no decoder for its "
                          f"transfer syntax {syntax.name}") from None
    if not decoder.is_available:
        raise RecordError("dicom_decoder_missing",
                          f"cannot decode the {syntax.name} pixel data of DICOM file {name}: no decoder plugin is "
                          f"installed; {_install_hint(decoder, 'a')}")


def render(source: bytes | Path, name: str) -> Image.Image:
    """DICOM pixel data -> 8-bit image ('L', or 'RGB' for colour), with the file's window/level when it has one."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    dataset = read_pixel_tags(source, name)
    check_pixels(dataset, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = dataset.pixel_array
    except Exception as exc:  # pydicom raises many types for truncated or unsupported data
        raise _decode_error(dataset, name, exc) from None
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    photometric = str(getattr(dataset, "PhotometricInterpretation", "MONOCHROME2"))
    samples = int(getattr(dataset, "SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[0]  # multi-frame: the first frame represents the series
    if samples == 3 or photometric == "PALETTE COLOR":
        if photometric == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            pixels = apply_color_lut(pixels, dataset)
        if pixels.dtype != np.uint8:
            pixels = to_uint8(pixels.astype(np.float64))
        return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    window = _first_window(dataset)
    if window is not None:
        # DICOM PS3.3 C.11.2.1.2 linear window, mapped onto 0..255.
        center, width = window
        image8 = to_uint8(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
    elif "VOILUTSequence" in dataset:
        image8 = to_uint8(apply_voi_lut(values, dataset).astype(np.float64))
    else:
        image8 = to_uint8(values)
    if photometric == "MONOCHROME1":
        image8 = 255 - image8
    return Image.fromarray(image8, mode="L")


def to_uint8(array: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Values in [low, high] (default: the array's min and max) scaled linearly onto 0..255."""
    low = float(np.nanmin(array)) if low is None else low
    high = float(np.nanmax(array)) if high is None else high
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (np.clip(array, low, high) - low) * (255.0 / (high - low))
    return np.nan_to_num(np.rint(scaled)).astype(np.uint8)


def _transfer_syntax(dataset):
    meta = getattr(dataset, "file_meta", None)
    return getattr(meta, "TransferSyntaxUID", None) if meta is not None else None


def _decode_error(dataset, name: str, exc: Exception) -> RecordError:
    """The error for pixel data that pydicom could not decode (the exception's type only: no header values)."""
    syntax = _transfer_syntax(dataset)
    if syntax is not None and syntax.is_compressed:
        from pydicom.pixels import get_decoder

        decoder = get_decoder(syntax)
        plugins = ", ".join(decoder.available_plugins) or "none"
        return RecordError("dicom_decode_failed",
                           f"cannot decode the {syntax.name} pixel data of DICOM file {name}: the installed decoder "
                           f"plugin(s) ({plugins}) failed ({type(exc).__name__}); {_install_hint(decoder, 'another')}")
    return RecordError("image_corrupt", f"cannot decode DICOM pixel data in {name}: {type(exc).__name__}")


def _install_hint(decoder, which: str) -> str:
    """'install a decoder: pip install ...', from pydicom's list of plugins whose dependencies are missing."""
    commands = []
    for line in decoder.missing_dependencies:  # e.g. "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1"
        _, _, needs = line.partition(" - requires ")
        found = [re.match(r"[A-Za-z0-9_.-]+", need.strip()) for need in needs.split(" and ")]
        names = [_PIP_NAMES.get(m.group(0), m.group(0)) for m in found if m and m.group(0) != "numpy"]
        if names:
            commands.append("pip install " + " ".join(names))
    commands.sort(key=lambda command: "pylibjpeg" not in command)  # the usual choice first
    if not commands:
        return "no other decoder plugin is known for it"
    others = f" (or: {'; '.join(commands[1:])})" if commands[1:] else ""
    return f"install {which} decoder: {commands[0]}{others}"


def _first_window(dataset) -> tuple[float, float] | None:
    from pydicom.multival import MultiValue

    center, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        center, width = (float(v[0]) if isinstance(v, MultiValue) else float(v) for v in (center, width))
    except (TypeError, ValueError, IndexError):
        return None
    return (center, width) if width >= 1 else None
