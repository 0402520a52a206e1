"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest

# What one worker may need at its peak: pytest with torch loaded, and a training or demo subprocess beside it.
WORKER_MEMORY_GIB = 4


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: a worker per CPU this process may use, no more than memory allows."""
    from aloe_cli.data.shard import available_cpus

    cpus = available_cpus()
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return cpus
    return max(1, min(cpus, int(memory_gib // WORKER_MEMORY_GIB)))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random-weight Qwen2-VL checkpoint (seed 0), built once per session.

    Its chat template has {% generation %} markers of its own. Built offline in
    a few seconds, so model-backed code can be tested without a model hub.
    Tests must treat it as read-only: it is shared by the session.
    """
    from aloe_cli.modeling.tiny import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_released_model_dir(tmp_path_factory):
    """The same tiny checkpoint with the chat template Qwen2-VL is released with (no generation markers)."""
    from aloe_cli.modeling.tiny import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl_released"), seed=0, template="released")
