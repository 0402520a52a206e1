"""Glue for the commands that generate (`score`, `eval`, `infer`): shared options -> one backend."""

from __future__ import annotations

import typer

from aloe_cli import console
from aloe_cli.modeling.backends import GenerationBackend
from aloe_cli.modeling.backends.factory import BackendConfig, build_backend


def open_backend(config: BackendConfig, announce: str) -> GenerationBackend:
    """The backend the options ask for, logged as `{announce} {description}` once it can serve.

    `--base-url` with `--backend hf` is a usage error (exit 2); a missing model folder or an unset
    `--api-key-env` variable is an AloeError (exit 1), raised before any record is read.
    """
    if config.kind == "hf" and config.base_url:
        raise typer.BadParameter("is for --backend openai", param_hint="--base-url")
    return build_backend(config, on_ready=lambda description: console.log(f"{announce} {description}"))
