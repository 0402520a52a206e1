"""Perceptual hashing, the parallel hasher and the near-duplicate index, on real images."""

from __future__ import annotations

import base64
import gzip
import json
import pickle
import random
import struct
from pathlib import Path

import imagehash
import matplotlib
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw, ImageFilter

from aloe_cli.data.images import load_image
from aloe_cli.errors import AloeError, RecordError
from aloe_cli.filters.hash_index import HashIndex
from aloe_cli.filters.hashing import (
    FAST_DRAFT_SIZE,
    HASH_FUNCTIONS,
    Hasher,
    from_hex,
    hash_image,
    hash_task,
    imagehash_to_int,
    to_hex,
)
from oracles import brute_force_search

SAMPLE_DATA = Path(matplotlib.__file__).parent / "mpl-data" / "sample_data"
GRACE = SAMPLE_DATA / "grace_hopper.jpg"
MRI_RAW = SAMPLE_DATA / "s1045.ima.gz"
# Files shipped inside pydicom; get_testdata_file() would try to download.
DICOM_DIR = Path(pydicom.data.__file__).parent / "test_files"

# fast vs exact: the largest difference measured over 254 JPEGs at the chosen
# draft size (see FAST_DRAFT_SIZE in aloe_cli/hashing.py).
FAST_TOLERANCE = 4


def distance(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def save_jpeg(image: Image.Image, path: Path, quality: int = 90) -> Path:
    image.save(path, "JPEG", quality=quality)
    return path


def synthetic_image(seed: int, size: int = 512) -> Image.Image:
    """Blurred noise plus shapes: structure at several scales, like a scan with anatomy."""
    rng = np.random.default_rng(seed)
    noise = Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(8))
    image = Image.eval(noise, lambda v: max(0, min(255, (v - 128) * 8 + 128))).convert("RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(5):
        x, y, r = (int(v) for v in rng.integers(40, size - 40, 3) % (size // 2))
        draw.ellipse([x, y, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """grace_hopper.jpg plus re-encoded, resized, cropped, JPEG and PNG variants."""
    out = tmp_path_factory.mktemp("photos")
    grace = Image.open(GRACE)
    grace.load()
    return [
        GRACE,
        save_jpeg(grace, out / "q60.jpg", 60),
        save_jpeg(grace.resize((300, 352), Image.LANCZOS), out / "small.jpg"),
        save_jpeg(grace.resize((1024, 1200), Image.BICUBIC), out / "large.jpg", 80),
        save_jpeg(grace.convert("L"), out / "gray.jpg"),
        _save_png(grace.crop((40, 60, 460, 520)), out / "crop.png"),
        _save_png(grace.convert("L").resize((256, 300)), out / "gray_small.png"),
    ]


def _save_png(image: Image.Image, path: Path) -> Path:
    image.save(path, "PNG")
    return path


# -- hex and int representation -------------------------------------------------


def test_hex_round_trip_and_imagehash_bit_order():
    rng = np.random.default_rng(0)
    for _ in range(50):
        value = imagehash.ImageHash(rng.random((8, 8)) > 0.5)
        h = imagehash_to_int(value)
        assert to_hex(h) == str(value)
        assert from_hex(str(value)) == h
        assert str(imagehash.hex_to_hash(to_hex(h))) == str(value)
    assert to_hex(0) == "0" * 16 and to_hex(2**64 - 1) == "f" * 16
    with pytest.raises(AloeError):
        from_hex("abc")  # wrong length: not a 64-bit hash
    with pytest.raises(AloeError):
        from_hex("zz" * 8)


# -- bit-identity with imagehash --------------------------------------------------


def test_phash_bit_identical_to_imagehash_on_photos(photos):
    for path in photos:
        assert to_hex(hash_image(str(path), None)) == str(imagehash.phash(Image.open(path))), path.name


def test_relative_paths_bytes_and_data_uris_hash_the_same(photos):
    expected = hash_image(str(GRACE))
    data = GRACE.read_bytes()
    assert hash_image(GRACE.name, GRACE.parent) == expected
    assert hash_image(data) == expected
    assert hash_image({"bytes": data, "path": "x.jpg"}) == expected
    assert hash_image("data:image/jpeg;base64," + base64.b64encode(data).decode()) == expected


@pytest.mark.parametrize("kind", ["phash", "dhash", "ahash", "whash"])
def test_every_kind_bit_identical_to_imagehash(kind):
    reference = {"phash": imagehash.phash, "dhash": imagehash.dhash,
                 "ahash": imagehash.average_hash, "whash": imagehash.whash}[kind]
    assert HASH_FUNCTIONS[kind] is reference
    assert to_hex(hash_image(str(GRACE), kind=kind)) == str(reference(Image.open(GRACE)))


def test_unknown_kind_is_a_user_error():
    with pytest.raises(AloeError, match="unknown hash kind"):
        hash_image(str(GRACE), kind="md5")
    with pytest.raises(AloeError):
        Hasher("colorhash")


# (file, expected Modality): grayscale 16-bit CT and MR, RGB secondary capture, two ultrasounds.
DICOM_CASES = [
    ("CT_small.dcm", "CT"),
    ("MR_small.dcm", "MR"),
    ("SC_rgb_jpeg.dcm", "OT"),
    ("examples_ybr_color.dcm", "US"),
    ("examples_palette.dcm", "US"),
]


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # a quirk of one pydicom sample file
@pytest.mark.parametrize("name,modality", DICOM_CASES, ids=[f"{m}-{n}" for n, m in DICOM_CASES])
def test_dicom_hash_matches_imagehash_of_the_rendering(name, modality):
    path = DICOM_DIR / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped with this pydicom")
    # Read only the label tag: the test checks it is hashing the modality it claims.
    assert pydicom.dcmread(path, specific_tags=["Modality"]).Modality == modality
    rendering = load_image(str(path))
    assert to_hex(hash_image(str(path))) == str(imagehash.phash(rendering))
    pixels = np.asarray(rendering)
    # 16-bit data is windowed/normalised to 8 bits, not clipped to a flat image.
    assert pixels.dtype == np.uint8 and int(pixels.max()) > int(pixels.min())
    assert len(np.unique(pixels)) > 16
    assert hash_image(str(path)) not in (0, 2**64 - 1)


def test_16bit_mri_png_is_normalised_before_hashing(tmp_path):
    with gzip.open(MRI_RAW) as f:  # 256x256 big-endian uint16, no header
        raw = np.frombuffer(f.read(), dtype=">u2").reshape(256, 256)
    path = tmp_path / "mri16.png"
    Image.fromarray(raw.astype(np.uint16)).save(path)
    rendering = load_image(str(path))
    assert rendering.mode == "L" and len(np.unique(np.asarray(rendering))) > 64
    assert to_hex(hash_image(str(path))) == str(imagehash.phash(rendering))


# -- fast mode ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def jpegs(tmp_path_factory, photos) -> list[Path]:
    out = tmp_path_factory.mktemp("jpegs")
    synthetic = [save_jpeg(synthetic_image(seed), out / f"synthetic{seed}.jpg", 85) for seed in range(3)]
    return [p for p in photos if p.suffix == ".jpg"] + synthetic


def test_fast_decodes_smaller_and_stays_close_to_exact(jpegs):
    for path in jpegs:
        full = Image.open(path).size
        reduced = load_image(str(path), draft_size=FAST_DRAFT_SIZE).size
        if min(full) >= 2 * FAST_DRAFT_SIZE:
            assert reduced[0] < full[0], path.name  # the speed-up is real
        exact, fast = hash_image(str(path)), hash_image(str(path), fast=True)
        assert distance(exact, fast) <= FAST_TOLERANCE, path.name


def test_fast_is_exact_for_non_jpeg(photos):
    for path in photos:
        if path.suffix == ".png":
            assert hash_image(str(path), fast=True) == hash_image(str(path))


def test_fast_catches_a_leaked_image(tmp_path, jpegs):
    for path in jpegs:
        fast = hash_image(str(path), fast=True)
        copy = tmp_path / f"copy_{path.name}"
        copy.write_bytes(path.read_bytes())
        assert hash_image(str(copy), fast=True) == fast  # deterministic: same bytes, same hash
        resaved = save_jpeg(Image.open(path), tmp_path / f"resaved_{path.name}", 60)
        assert distance(hash_image(str(resaved), fast=True), fast) <= FAST_TOLERANCE, path.name
    # ...while different images stay far apart, so the threshold means something.
    assert distance(hash_image(str(jpegs[0]), fast=True), hash_image(str(jpegs[-1]), fast=True)) > 12


# -- HashIndex: multi-index hashing equals brute force ------------------------------


def _flip(h: int, bits: int, rng: random.Random) -> int:
    for bit in rng.sample(range(64), bits):
        h ^= 1 << bit
    return h


@pytest.fixture(scope="module")
def corpus():
    """~5,000 random hashes, planted neighbours at distances 0-10 and a tight
    cluster sharing 40 high bits (big chunk buckets, the packed numpy path)."""
    rng = random.Random(1234)
    hashes = [rng.getrandbits(64) for _ in range(5000)]
    bases = hashes[:150]
    for base in bases:
        for bits in (0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10):
            hashes.append(_flip(base, bits, rng))
    prefix = rng.getrandbits(40) << 24
    hashes += [prefix | rng.getrandbits(24) for _ in range(600)]
    entries = [(h, ("train", i)) for i, h in enumerate(hashes)]
    queries = [rng.getrandbits(64) for _ in range(60)]
    # planted queries: the i-th is i % 9 bits away from an indexed hash
    queries += [_flip(base, i % 9, rng) for i, base in enumerate(bases[:63])]
    queries += [prefix | rng.getrandbits(24) for _ in range(20)] + [hashes[5000]]
    return entries, queries


@pytest.mark.parametrize("max_distance", range(9))
def test_search_equals_brute_force(corpus, max_distance):
    entries, queries = corpus
    index = HashIndex(max_distance)
    for h, payload in entries:
        index.add(h, payload)
    assert len(index) == len(entries)
    nonempty = 0
    for q in queries:
        expected = brute_force_search(entries, q, max_distance)
        assert index.search(q) == expected
        nonempty += bool(expected)
        # A tighter radius than the index was built for is still exact.
        assert index.search(q, max_distance // 2) == brute_force_search(entries, q, max_distance // 2)
    # the planted neighbours are actually found
    assert nonempty >= sum(1 for i in range(63) if i % 9 <= max_distance)
    with pytest.raises(ValueError):
        index.search(queries[0], max_distance + 1)


def test_exact_returns_all_duplicates_in_order(corpus):
    entries, _ = corpus
    for max_distance in (0, 4):
        index = HashIndex(max_distance)
        for h, payload in entries:
            index.add(h, payload)
        base = entries[0][0]
        # bases were planted twice at distance 0, so three entries share the hash
        expected = [payload for h, payload in entries if h == base]
        assert len(expected) >= 3 and index.exact(base) == expected
        assert index.exact(base ^ 1) == [p for h, p in entries if h == base ^ 1]


def test_incremental_add_after_search_matches_brute_force(corpus):
    """The within-dataset dedup loop: search what came before, then add."""
    entries, _ = corpus
    index = HashIndex(6)
    seen: list = []
    for i, (h, payload) in enumerate(entries):
        if i % 7 == 0 or i >= 5000:  # check a sample, and every planted/cluster entry
            assert index.search(h) == brute_force_search(seen, h, 6)
        index.add(h, payload)
        seen.append((h, payload))
    assert list(index) == entries


def test_index_rejects_bad_arguments():
    with pytest.raises(AloeError):
        HashIndex(-1)
    with pytest.raises(AloeError):
        HashIndex(64)
    index = HashIndex(2)
    with pytest.raises(ValueError):
        index.add(2**64, "x")
    with pytest.raises(ValueError):
        index.add(-1, "x")
    index.add(np.uint64(2**64 - 1), "numpy")
    assert index.search(2**64 - 2) == [("numpy", 1)]


# -- save / load --------------------------------------------------------------------


def test_save_load_round_trip_and_rebuild_for_another_distance(tmp_path, corpus):
    entries, queries = corpus
    index = HashIndex(0)
    for h, payload in entries:
        index.add(h, payload)
    path = tmp_path / "train.hashidx"
    index.save(path, {"kind": "phash", "fast": True, "created_by": "test"})
    for max_distance in (0, 3, 8):
        loaded, meta = HashIndex.load(path, max_distance)
        assert meta == {"kind": "phash", "fast": True, "created_by": "test", "sources": ["train"]}
        assert list(loaded) == entries and len(loaded) == len(entries)
        for q in queries:
            assert loaded.search(q) == brute_force_search(entries, q, max_distance)
    # A loaded index keeps working incrementally.
    loaded.add(queries[0], ("test", "extra"))
    assert loaded.search(queries[0])[0] == (("test", "extra"), 0)
    assert loaded.search(queries[0]) == brute_force_search(list(loaded), queries[0], 8)


def test_save_load_string_row_ids_several_sources_and_empty(tmp_path):
    index = HashIndex(1)
    index.add(5, ("train", "rec-1"))
    index.add(5, ("valid", 7))
    index.add(2**64 - 1, ("test", "é/ü"))
    index.save(tmp_path / "mixed.idx", {"kind": "dhash", "fast": False})
    loaded, meta = HashIndex.load(tmp_path / "mixed.idx", 2)
    assert list(loaded) == [(5, ("train", "rec-1")), (5, ("valid", 7)), (2**64 - 1, ("test", "é/ü"))]
    assert meta["sources"] == ["train", "valid", "test"] and meta["kind"] == "dhash" and meta["fast"] is False
    assert loaded.search(4) == [(("train", "rec-1"), 1), (("valid", 7), 1)]

    HashIndex(0).save(tmp_path / "empty.idx", {"kind": "phash", "fast": False})
    empty, _ = HashIndex.load(tmp_path / "empty.idx", 5)
    assert len(empty) == 0 and empty.search(0) == []


def test_save_requires_kind_fast_and_source_row_payloads(tmp_path):
    index = HashIndex(0)
    index.add(1, ("train", 1))
    with pytest.raises(AloeError):
        index.save(tmp_path / "a.idx", {"fast": False})
    with pytest.raises(AloeError):
        index.save(tmp_path / "a.idx", {"kind": "phash"})
    index.add(2, "not a pair")
    with pytest.raises(AloeError, match="payload"):
        index.save(tmp_path / "a.idx", {"kind": "phash", "fast": False})
    assert not (tmp_path / "a.idx").exists()


def test_corrupt_or_foreign_files_raise_aloe_error(tmp_path, corpus):
    entries, _ = corpus
    index = HashIndex(0)
    for h, payload in entries[:100]:
        index.add(h, payload)
    good = tmp_path / "good.idx"
    index.save(good, {"kind": "phash", "fast": False})
    data = good.read_bytes()

    def header_with(**changes) -> bytes:
        (length,) = struct.unpack_from("<I", data, 8)
        header = json.loads(data[12:12 + length])
        header.update(changes)
        encoded = json.dumps(header).encode()
        return data[:8] + struct.pack("<I", len(encoded)) + encoded + data[12 + length:]

    flipped = bytearray(data)
    flipped[-5] ^= 0xFF
    cases = {
        "missing.idx": None,
        "foreign.idx": b'{"not": "an index"}',
        "png.idx": GRACE.read_bytes()[:500],
        "empty.idx": b"",
        "truncated.idx": data[:-17],
        "cut_header.idx": data[:20],
        "bitflip.idx": bytes(flipped),
        "trailing.idx": data + b"x",
        "future.idx": header_with(version=99),
        "unknown_kind.idx": header_with(kind="sha1"),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(AloeError) as caught:
            HashIndex.load(path, 2)
        assert not isinstance(caught.value, RecordError), name
        assert str(path) in str(caught.value), name
    with pytest.raises(AloeError, match="version 99"):
        HashIndex.load(tmp_path / "future.idx")


# -- Hasher: pool vs loop, errors as results ----------------------------------------


@pytest.fixture(scope="module")
def bad_images(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("bad")
    (out / "empty.jpg").write_bytes(b"")
    data = GRACE.read_bytes()
    (out / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (out / "text.png").write_text("this is not an image\n")
    return {
        "image_missing": out / "missing.jpg",
        "image_corrupt": out / "empty.jpg",
        "image_truncated": out / "truncated.jpg",
        "image_corrupt ": out / "text.png",  # trailing space: a second case with the same reason
    }


def test_hash_task_returns_errors_instead_of_raising(bad_images):
    for reason, path in bad_images.items():
        result = hash_task((str(path), None, "phash", False))
        assert result.hash is None and result.reason == reason.strip() and result.message
    good = hash_task((GRACE.name, str(GRACE.parent), "phash", False))
    assert good == (hash_image(str(GRACE)), None, None)


def test_worker_and_results_pickle_for_spawn():
    # Under 'spawn' (macOS, Windows) the worker is sent by reference and results by value.
    result = hash_task((str(GRACE), None, "phash", False))
    assert pickle.loads(pickle.dumps(hash_task)) is hash_task
    assert pickle.loads(pickle.dumps(result)) == result


def test_hasher_pool_matches_loop_and_survives_bad_images(photos, bad_images):
    dicom = DICOM_DIR / "CT_small.dcm"
    good = [(str(p), None) for p in photos] + [(p.name, str(p.parent)) for p in photos] + [(str(dicom), None)]
    bad = [(str(p), None) for p in bad_images.values()]
    tasks = []
    for i, task in enumerate(good):  # interleave so order preservation is tested
        tasks.append(task)
        if i < len(bad):
            tasks.append(bad[i])
    with Hasher("phash", fast=False, workers=1) as serial:
        expected = serial.hash_many(tasks)
    with Hasher("phash", fast=False, workers=2) as pooled:
        results = pooled.hash_many(tasks)
        # The pool outlives the bad images: a second batch on the same workers works.
        again = pooled.hash_many(list(reversed(tasks)))
        streamed = list(pooled.hash_iter(iter(tasks), chunksize=3))
    assert results == expected and again == list(reversed(expected)) and streamed == expected
    for task, result in zip(tasks, results):
        if task in bad:
            assert result.hash is None and result.reason in {"image_missing", "image_corrupt", "image_truncated"}
        else:
            assert result.reason is None and result.hash == hash_image(task[0], task[1])
    reasons = [r.reason for r in results if r.reason]
    assert sorted(reasons) == sorted(k.strip() for k in bad_images)


def test_hasher_fast_and_kind_reach_the_workers(jpegs):
    tasks = [(str(p), None) for p in jpegs]
    with Hasher("dhash", fast=True, workers=2) as hasher:
        results = hasher.hash_many(tasks)
    assert [r.hash for r in results] == [hash_image(str(p), kind="dhash", fast=True) for p in jpegs]
    with pytest.raises(AloeError):
        Hasher(workers=0)
