import base64
import struct
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from aloe_cli.data.images import load_image, to_data_uri
from aloe_cli.errors import RecordError
from support import jpeg_bytes, scan

DICOM_DIR = Path(pydicom.__file__).parent / "data" / "test_files"


def test_paths_data_uris_bytes_and_hf_structs_decode_the_same(tmp_path):
    data = jpeg_bytes(scan(1))
    (tmp_path / "x.jpg").write_bytes(data)
    reference = np.asarray(load_image("x.jpg", tmp_path))
    for entry in (str(tmp_path / "x.jpg"), to_data_uri(data), data, {"bytes": data, "path": None},
                  {"bytes": None, "path": "x.jpg"}):
        assert np.array_equal(np.asarray(load_image(entry, tmp_path)), reference)


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    ramp = (np.linspace(0, 4000, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ct16.png")
    assert Image.open(tmp_path / "ct16.png").mode.startswith("I")
    image = load_image(str(tmp_path / "ct16.png"))
    pixels = np.asarray(image)
    assert image.mode == "L" and pixels.min() == 0 and pixels.max() == 255
    assert len(np.unique(pixels)) > 200  # a plain convert('L') would clip almost everything to 255


@pytest.mark.parametrize("make, mode", [
    (lambda: Image.new("P", (8, 8)), "RGB"),
    (lambda: _palette_with_transparency(), "RGB"),
    (lambda: Image.new("CMYK", (8, 8), (0, 255, 0, 0)), "RGB"),
    (lambda: Image.new("LA", (8, 8), (10, 0)), "L"),
    (lambda: Image.new("RGBA", (8, 8), (255, 0, 0, 0)), "RGB"),
    (lambda: Image.new("1", (8, 8), 1), "L"),
    (lambda: Image.new("I", (8, 8), 70000), "L"),
])
def test_every_mode_becomes_l_or_rgb(tmp_path, make, mode):
    image = make()
    path = tmp_path / ("x.tiff" if image.mode in ("CMYK", "I") else "x.png")
    image.save(path)
    assert load_image(str(path)).mode == mode


def _palette_with_transparency():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.info["transparency"] = 0
    return image


def test_transparent_pixels_composite_onto_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert load_image(str(tmp_path / "t.png")).getpixel((0, 0)) == (255, 255, 255)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("name, content, reason", [
    ("missing.jpg", None, "image_missing"),
    ("empty.jpg", b"", "image_corrupt"),
    ("text.png", b"this is not an image at all", "image_corrupt"),
    ("truncated.jpg", "truncated", "image_truncated"),
    ("bomb.png", _png_header_only(30000, 30000), "image_too_large"),
    ("fake.dcm", b"\x00" * 200, "image_corrupt"),
])
def test_bad_images_raise_record_errors_with_reasons(tmp_path, name, content, reason):
    path = tmp_path / name
    if content == "truncated":
        data = jpeg_bytes(scan(3, size=256))
        content = data[: len(data) // 2]
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RecordError) as info:
        load_image(name, tmp_path)
    assert info.value.reason == reason
    assert "Traceback" not in str(info.value)


def test_bad_data_uri():
    with pytest.raises(RecordError) as info:
        load_image("data:image/png;base64," + base64.b64encode(b"nope").decode())
    assert info.value.reason == "image_corrupt"
    with pytest.raises(RecordError) as info:
        load_image("data:image/png,plain")
    assert info.value.reason == "image_invalid"


@pytest.mark.parametrize("name, mode", [
    ("CT_small.dcm", "L"), ("MR_small.dcm", "L"), ("SC_rgb_small_odd.dcm", "RGB"),
    ("examples_ybr_color.dcm", "RGB"), ("examples_palette.dcm", "RGB"), ("liver_1frame.dcm", "L"),
    ("MR_small_RLE.dcm", "L"),
])
def test_real_dicom_files_render_to_8_bit(name, mode):
    image = load_image(str(DICOM_DIR / name))
    pixels = np.asarray(image)
    assert image.mode == mode and pixels.dtype == np.uint8
    assert pixels.std() > 5  # real structure, not a constant or clipped image


def test_dicom_window_level_is_used_when_present(tmp_path):
    dataset = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    values = dataset.pixel_array.astype(float) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    dataset.WindowCenter, dataset.WindowWidth = 40, 80  # a narrow soft-tissue window
    dataset.save_as(tmp_path / "windowed.dcm")
    pixels = np.asarray(load_image(str(tmp_path / "windowed.dcm")))
    low, high = 40 - 0.5 - 79 / 2, 40 - 0.5 + 79 / 2
    assert np.all(pixels[values <= low] == 0) and np.all(pixels[values >= high] == 255)
    del dataset.WindowCenter, dataset.WindowWidth
    dataset.save_as(tmp_path / "plain.dcm")
    plain = np.asarray(load_image(str(tmp_path / "plain.dcm")))
    assert plain.min() == 0 and plain.max() == 255 and not np.array_equal(plain, pixels)


def test_dicom_headers_are_never_read(tmp_path, monkeypatch):
    dataset = pydicom.dcmread(DICOM_DIR / "CT_small.dcm")
    dataset.PatientName, dataset.PatientID = "SECRET^PATIENT", "ID-424242"
    dataset.save_as(tmp_path / "p.dcm")
    seen = []
    real_dcmread = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: seen.append(real_dcmread(*a, **k)) or seen[-1])
    load_image(str(tmp_path / "p.dcm"))
    assert "PatientName" not in seen[0] and "PatientID" not in seen[0] and "PixelData" in seen[0]


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(str(tmp_path / "rotated.jpg")).size == (20, 40)
