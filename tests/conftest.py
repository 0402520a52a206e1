"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


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
