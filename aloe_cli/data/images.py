"""Image references -> PIL images, with the safety limits medical data needs.

An entry of a record's `images` list is one of
- a path (relative paths resolve against the image root),
- a `data:image/...;base64,` URI,
- a dict `{"bytes": ..., "path": ...}` (the HF `Image` feature, from parquet or datasets),
- raw bytes.
`.dcm` paths (and bytes that start with the DICOM preamble) are read with
pydicom. Only pixel-related tags are ever read from a DICOM file, so patient
data in its header cannot leak into records, reports or logs.

Every failure is a `RecordError` with a reason code, so the stage runner can
fail or reject the record.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

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
_DICOM_MAGIC_OFFSET = 128


def describe(entry: Any) -> str:
    """A short, log-safe name for an image entry (never dumps base64 or bytes)."""
    if isinstance(entry, str):
        return entry[:40] + "..." if entry.startswith("data:") else entry
    if isinstance(entry, dict) and entry.get("path"):
        return str(entry["path"])
    return "<embedded image>"


def is_dicom_bytes(data: bytes) -> bool:
    return data[_DICOM_MAGIC_OFFSET:_DICOM_MAGIC_OFFSET + 4] == b"DICM"


def _decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise RecordError("image_invalid", "data URI is not base64-encoded")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise RecordError("image_invalid", f"data URI is not valid base64 ({exc})") from None


def resolve_path(entry: str, image_root: str | os.PathLike | None) -> Path:
    path = Path(entry).expanduser()
    if not path.is_absolute() and image_root is not None:
        path = Path(image_root) / path
    return path


def read_source(entry: Any, image_root: str | os.PathLike | None) -> tuple[bytes | Path, bool]:
    """Return (bytes or path, is_dicom) for an entry; raise RecordError if it cannot be found."""
    if isinstance(entry, dict):
        if entry.get("bytes"):
            data = bytes(entry["bytes"])
            return data, is_dicom_bytes(data)
        if entry.get("path"):
            entry = entry["path"]
        else:
            raise RecordError("image_invalid", "image entry has neither bytes nor path")
    if isinstance(entry, (bytes, bytearray, memoryview)):
        data = bytes(entry)
        return data, is_dicom_bytes(data)
    if not isinstance(entry, str) or not entry:
        raise RecordError("image_invalid", f"image entry must be a path, data URI or bytes, got {type(entry).__name__}")
    if entry.startswith("data:"):
        data = _decode_data_uri(entry)
        return data, is_dicom_bytes(data)
    path = resolve_path(entry, image_root)
    if not path.is_file():
        raise RecordError("image_missing", f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise RecordError("image_corrupt", f"image file is empty: {path}")
    return path, path.suffix.lower() == ".dcm"


def load_image(entry: Any, image_root: str | os.PathLike | None = None, *,
               draft_size: int | None = None) -> Image.Image:
    """Decode one image entry to a PIL image in mode 'RGB' or 'L'.

    `draft_size` asks JPEG decoders for a reduced-size decode (at least that
    many pixels a side); it is a speed knob for hashing, ignored by other formats.
    """
    source, dicom = read_source(entry, image_root)
    name = describe(entry)
    if dicom:
        return _load_dicom(source, name)
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its pixel limit; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if draft_size and image.format == "JPEG":
                image.draft("RGB" if image.mode in ("RGB", "YCbCr", "CMYK") else image.mode, (draft_size, draft_size))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS
        raise RecordError("image_too_large",
                          f"image exceeds Pillow's decompression-bomb limit of {limit} pixels: {name}") from None
    except UnidentifiedImageError:
        raise RecordError("image_corrupt", f"not a readable image: {name}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "image_truncated" if "truncated" in str(exc).lower() else "image_corrupt"
        raise RecordError(reason, f"cannot decode image {name}: {exc}") from None
    try:
        # In place: the usual image has no orientation tag, and a copy of every
        # decoded image would cost as much as a quarter of the hashing.
        ImageOps.exif_transpose(image, in_place=True)
    except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
        pass
    return to_standard_mode(image)


def to_standard_mode(image: Image.Image) -> Image.Image:
    """Bring any Pillow mode that medical data brings to 'L' or 'RGB'.

    16/32-bit grayscale and float images are min-max scaled to 8 bits (a
    plain convert would clip them); transparency is composited onto white.
    """
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(image, dtype=np.float64)), mode="L")
    if mode == "1":
        return image.convert("L")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
    if mode in ("LA", "La", "PA"):
        image = image.convert("LA")
        background = Image.new("LA", image.size, (255, 255))
        return Image.alpha_composite(background, image).convert("L")
    if mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX


def _to_uint8(array: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    low = float(np.nanmin(array)) if low is None else low
    high = float(np.nanmax(array)) if high is None else high
    if not np.isfinite(low) or not np.isfinite(high) or high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (np.clip(array, low, high) - low) * (255.0 / (high - low))
    return np.nan_to_num(np.rint(scaled)).astype(np.uint8)


def _load_dicom(source: bytes | Path, name: str) -> Image.Image:
    """DICOM pixel data -> 8-bit image, using the file's window/level when it has one."""
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else source,
                                  specific_tags=DICOM_PIXEL_TAGS)
        pixels = dataset.pixel_array
    except InvalidDicomError:
        raise RecordError("image_corrupt", f"not a DICOM file: {name}") from None
    except Exception as exc:  # pydicom raises many types for truncated or unsupported data
        raise RecordError("image_corrupt", f"cannot decode DICOM pixel data in {name}: {type(exc).__name__}") from None
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
            pixels = _to_uint8(pixels.astype(np.float64))
        return Image.fromarray(np.ascontiguousarray(pixels), mode="RGB")
    values = apply_modality_lut(pixels, dataset).astype(np.float64)
    window = _first_window(dataset)
    if window is not None:
        # DICOM PS3.3 C.11.2.1.2 linear window, mapped onto 0..255.
        center, width = window
        image8 = _to_uint8(values, center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2)
    elif "VOILUTSequence" in dataset:
        image8 = _to_uint8(apply_voi_lut(values, dataset).astype(np.float64))
    else:
        image8 = _to_uint8(values)
    if photometric == "MONOCHROME1":
        image8 = 255 - image8
    return Image.fromarray(image8, mode="L")


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


def image_mime(data: bytes) -> str:
    """Best-effort MIME type from magic bytes (for writing data URIs)."""
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    if data.startswith(b"BM"):
        return "image/bmp"
    if is_dicom_bytes(data):
        return "application/dicom"
    return "application/octet-stream"


def to_data_uri(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


# A truncated file must be an error, never a half-grey image.
ImageFile.LOAD_TRUNCATED_IMAGES = False
