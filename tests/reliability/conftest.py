"""Fixtures of the reliability suite: the demo data, the fake judge, and a context for building commands."""

from __future__ import annotations

import pytest
from fake_openai_server import FakeOpenAIServer


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    """The demo data set (train.jsonl: 57 records with images, eval.tsv with planted leaks). Read-only."""
    from aloe_cli.demo.sample_data import write_sample_data

    return write_sample_data(tmp_path_factory.mktemp("demo")).train.parent


@pytest.fixture(scope="session")
def judge():
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def ctx(demo, judge, tiny_model_dir):
    """What `hostile.stage_args` needs to build any data command."""
    return {"demo": demo, "judge": judge, "model": tiny_model_dir}


@pytest.fixture
def train_lines(demo) -> list[bytes]:
    return (demo / "train.jsonl").read_bytes().splitlines(keepends=True)
