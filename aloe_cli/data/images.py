"""Image references -> PIL images, with the safety limits medical data needs.

An entry of a record's `images` list is one of
- a path (relative paths resolve against the image root),
- a `data:image/...;base64,` URI,
- a dict `{"bytes": ..., "path": ...}` (the HF `Image` feature, from parquet or datasets),
- raw bytes.
DICOM (`.dcm` paths, and any entry whose bytes carry the `DICM` magic: paths
with another name, data URIs whatever MIME type they claim) is read by
`data.dicom`, which reads only pixel-related tags. Embedded DICOM data carries
its header, which may hold patient data: normalisation on read replaces it
with its rendered pixels (`without_dicom_header`).

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

from aloe_cli.data import dicom
from aloe_cli.data.dicom import DICOM_PIXEL_TAGS, is_dicom_bytes, is_embedded_dicom, to_uint8
from aloe_cli.errors import RecordError

__all__ = ["DICOM_PIXEL_TAGS", "check_entry_type", "check_images", "describe", "image_mime", "is_dicom_bytes",
           "is_embedded_dicom", "load_image", "png_bytes", "probe_image", "read_source", "relocate",
           "resolve_path", "to_data_uri", "to_standard_mode", "without_dicom_header"]

# Suffixes of the formats Pillow reads: such a path goes to Pillow first; any other (or none) is sniffed for DICOM.
_PILLOW_SUFFIXES = frozenset((".png", ".jpg", ".jpeg", ".jpe", ".tif", ".tiff", ".bmp", ".gif", ".webp", ".jp2",
                              ".j2k", ".jpx", ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga"))


def describe(entry: Any) -> str:
    """A short, log-safe name for an image entry (never dumps base64 or bytes)."""
    if isinstance(entry, str):
        return entry[:40] + "..." if entry.startswith("data:") else entry
    if isinstance(entry, dict) and entry.get("path"):
        return str(entry["path"])
    return "<embedded image>"


def png_bytes(image: Image.Image) -> bytes:
    """The pixels alone as PNG: no text chunks, EXIF, ICC profile or other metadata."""
    clean = Image.frombytes(image.mode, image.size, image.tobytes())  # a new image: empty .info
    buffer = io.BytesIO()
    clean.save(buffer, format="PNG")
    return buffer.getvalue()


def without_dicom_header(entry: Any, image_root: str | os.PathLike | None = None) -> Any:
    """`entry`, or for embedded DICOM data its pixels as PNG, in the entry's own form.

    The pixels are rendered as `load_image` renders DICOM (window/level or
    min-max, 8 bits), so every stage sees the same image; the header, which
    may hold patient data, is gone. DICOM referenced by path stays a path.
    Raises RecordError when the pixels cannot be decoded.
    """
    if not is_embedded_dicom(entry):
        return entry
    png = png_bytes(load_image(entry, image_root))
    if isinstance(entry, dict):
        return {**entry, "bytes": png}
    if isinstance(entry, str):
        return to_data_uri(png)
    return png


def _decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise RecordError("image_invalid", "data URI is not base64-encoded")
    try:
        data = base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as exc:
        raise RecordError("image_invalid", f"data URI is not valid base64 ({exc})") from None
    if not data:
        raise RecordError("image_invalid", "data URI holds no base64 data")
    return data


def resolve_path(entry: str, image_root: str | os.PathLike | None) -> Path:
    path = Path(entry).expanduser()
    if not path.is_absolute() and image_root is not None:
        path = Path(image_root) / path
    return path


def relocate(entry: Any, image_root: str | os.PathLike | None, folder: str | os.PathLike | None) -> Any:
    """An image entry as a record written into `folder` must hold it to find the same file.

    A path (or a `{path}` struct without bytes) that resolved against `image_root` becomes relative to
    `folder`, or absolute when `folder` is None; data URIs, bytes and structs with bytes are returned as
    they are. `folder` should be resolved as a reader resolves an input's folder (symlinks followed).
    """
    if isinstance(entry, dict):
        if entry.get("bytes") or not isinstance(entry.get("path"), str):
            return entry
        return {**entry, "path": relocate(entry["path"], image_root, folder)}
    if not isinstance(entry, str) or entry.startswith("data:") or not entry.strip():
        return entry
    path = os.path.abspath(resolve_path(entry, image_root))
    return path if folder is None else os.path.relpath(path, folder)


def read_source(entry: Any, image_root: str | os.PathLike | None) -> tuple[bytes | Path, bool]:
    """Return (bytes or path, is_dicom) for an entry; raise RecordError if it cannot be found."""
    check_entry_type(entry)
    if isinstance(entry, dict):
        if entry.get("bytes"):
            data = bytes(entry["bytes"])
            return data, is_dicom_bytes(data)
        entry = entry["path"]
    if isinstance(entry, (bytes, bytearray, memoryview)):
        data = bytes(entry)
        return data, is_dicom_bytes(data)
    if entry.startswith("data:"):
        data = _decode_data_uri(entry)
        return data, is_dicom_bytes(data)
    path = resolve_path(entry, image_root)
    if not path.is_file():
        raise RecordError("image_missing", f"image file not found: {path}")
    if path.stat().st_size == 0:
        raise RecordError("image_corrupt", f"image file is empty: {path}")
    suffix = path.suffix.lower()
    return path, suffix == ".dcm" or (suffix not in _PILLOW_SUFFIXES and dicom.file_is_dicom(path))


def check_entry_type(entry: Any) -> None:
    """RecordError unless `entry` has the shape of an image: a path or data URI, bytes, or a {bytes, path} struct."""
    if isinstance(entry, str):
        if not entry or entry.isspace():
            raise RecordError("image_invalid", "empty image entry (neither a path nor a data URI)")
        return
    if isinstance(entry, (bytes, bytearray, memoryview)):
        if not len(entry):
            raise RecordError("image_invalid", "empty image bytes")
        return
    if isinstance(entry, dict):
        if entry.get("bytes") is not None and not isinstance(entry["bytes"], (bytes, bytearray, memoryview)):
            raise RecordError("image_invalid", "an image struct's 'bytes' must be binary data")
        if not entry.get("bytes") and not (isinstance(entry.get("path"), str) and entry["path"].strip()):
            raise RecordError("image_invalid", "image struct has neither bytes nor a path")
        return
    kind = "null" if entry is None else type(entry).__name__
    raise RecordError("image_invalid", f"image entry must be a path, data URI, bytes or {{bytes, path}} struct, "
                      f"got {kind}")


def load_image(entry: Any, image_root: str | os.PathLike | None = None, *,
               draft_size: int | None = None) -> Image.Image:
    """Decode one image entry to a PIL image in mode 'RGB' or 'L'.

    `draft_size` asks JPEG decoders for a reduced-size decode (at least that
    many pixels a side); it is a speed knob for hashing, ignored by other formats.
    """
    source, is_dicom = read_source(entry, image_root)
    name = describe(entry)
    if not is_dicom:
        image = _open_pillow(source, name, draft_size=draft_size, load=True)
        if image is not None:
            try:
                # In place: the usual image has no orientation tag, and a copy of every
                # decoded image would cost as much as a quarter of the hashing.
                ImageOps.exif_transpose(image, in_place=True)
            except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the image
                pass
            return to_standard_mode(image)
        _require_dicom(source, name)  # a DICOM file whose name does not say so
    return dicom.render(source, name)


# EXIF orientations that turn the image by 90 degrees: the decoded image has width and height swapped.
_EXIF_ORIENTATION = 0x0112
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def probe_image(entry: Any, image_root: str | os.PathLike | None = None) -> tuple[int, int]:
    """(width, height) as `load_image` will return the image, checked from the header alone.

    Pixels are never decoded: the entry's type, a data URI's base64, that a
    path is an existing, non-empty file, and the header (a format Pillow
    reads, within its decompression-bomb limit; or DICOM with pixel data and an
    installed decoder for its transfer syntax). Raises RecordError otherwise.
    """
    source, is_dicom = read_source(entry, image_root)
    name = describe(entry)
    if not is_dicom:
        image = _open_pillow(source, name, load=False)
        if image is not None:
            with image:
                width, height = image.size
                try:
                    orientation = image.getexif().get(_EXIF_ORIENTATION)
                except Exception:  # noqa: BLE001 - load_image ignores a broken EXIF block too
                    orientation = None
            return (height, width) if orientation in _TRANSPOSING_ORIENTATIONS else (width, height)
        _require_dicom(source, name)
    dataset = dicom.read_pixel_tags(source, name, defer_size=1024)  # large values (the pixels) are skipped
    dicom.check_pixels(dataset, name)
    return int(dataset.Columns), int(dataset.Rows)


def check_images(images: list, image_root: str | os.PathLike | None = None) -> None:
    """`probe_image` every entry of a record's `images`; the RecordError names `images[n]`."""
    for position, entry in enumerate(images):
        try:
            probe_image(entry, image_root)
        except RecordError as error:
            raise RecordError(error.reason, error.message, field=f"images[{position}]") from None


def _open_pillow(source: bytes | Path, name: str, *, draft_size: int | None = None,
                 load: bool) -> Image.Image | None:
    """Open (and with `load`, decode) with Pillow; None when Pillow does not know the format."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Corrupt EXIF data" while probing a DICOM file
            # Pillow only warns between 1x and 2x its pixel limit; we refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            if load:
                if draft_size and image.format == "JPEG":
                    image.draft("RGB" if image.mode in ("RGB", "YCbCr", "CMYK") else image.mode,
                                (draft_size, draft_size))
                image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        limit = Image.MAX_IMAGE_PIXELS
        raise RecordError("image_too_large",
                          f"image exceeds Pillow's decompression-bomb limit of {limit} pixels: {name}") from None
    except UnidentifiedImageError:
        return None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        reason = "image_truncated" if "truncated" in str(exc).lower() else "image_corrupt"
        raise RecordError(reason, f"cannot decode image {name}: {exc}") from None
    return image


def _require_dicom(source: bytes | Path, name: str) -> None:
    """Pillow does not know the format: fine if it is DICOM (by its magic), else the entry is no image."""
    if isinstance(source, Path) and dicom.file_is_dicom(source):
        return
    if isinstance(source, bytes) and not source:
        raise RecordError("image_corrupt", f"image data is empty: {name}")
    raise RecordError("image_corrupt", f"not a readable image: {name}")


def to_standard_mode(image: Image.Image) -> Image.Image:
    """Bring any Pillow mode that medical data brings to 'L' or 'RGB'.

    16/32-bit grayscale and float images are min-max scaled to 8 bits (a
    plain convert would clip them); transparency is composited onto white.
    """
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(to_uint8(np.asarray(image, dtype=np.float64)), mode="L")
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
