"""Benchmark the header-only image check `aloe mix` runs on every image, against a full decode.

    python benchmarks/image_checks.py [--images 300] [--size 512] [--workdir bench_out/image_checks]

Writes --images random RGB JPEGs (--size pixels a side) and a copy of a DICOM
file per image, then times, on the same files in the same run,
`images.probe_image` (what mix does: open, read the header, no pixels) and
`images.load_image` (what the stages that decode do), and prints the time per
image of each and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_images(folder: Path, count: int, size: int) -> tuple[list[str], list[str]]:
    import numpy as np
    import pydicom.data
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    dicom_source = Path(pydicom.data.__file__).parent / "test_files" / "CT_small.dcm"
    jpegs, dicoms = [], []
    for i in range(count):
        jpeg = folder / f"img{i:05d}.jpg"
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(jpeg, quality=90)
        dicom = folder / f"img{i:05d}.dcm"
        shutil.copy(dicom_source, dicom)
        jpegs.append(str(jpeg))
        dicoms.append(str(dicom))
    return jpegs, dicoms


def per_image(function, paths: list[str]) -> float:
    function(paths[0])  # imports and first-use costs out of the timing
    started = time.perf_counter()
    for path in paths:
        function(path)
    return (time.perf_counter() - started) / len(paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--workdir", type=Path, default=Path("bench_out/image_checks"))
    args = parser.parse_args()
    from aloe_cli.data.images import load_image, probe_image

    jpegs, dicoms = make_images(args.workdir, args.images, args.size)
    for label, paths in ((f"JPEG {args.size}x{args.size}", jpegs), ("DICOM CT_small (128x128, 16 bit)", dicoms)):
        check = per_image(probe_image, paths)
        decode = per_image(load_image, paths)
        print(f"{label}: header check {check * 1e6:.0f} us/image, full decode {decode * 1e6:.0f} us/image "
              f"-> the check costs 1/{decode / check:.1f} of a decode")


if __name__ == "__main__":
    main()
