"""One backend from the options every generating command shares (`--backend`, `--base-url`, ...).

    config = BackendConfig(model="Qwen/Qwen2-VL-7B-Instruct", backend="openai", base_url="http://judge:8000/v1")
    backend = build_backend(config, on_ready=log)       # on_ready(description) once it can serve

`backend=None` picks `openai` when a base URL is given, else `hf`. The hf backend loads its model on the first
request that needs one, so a run answered entirely from a response cache never loads a model. Importing
this module imports neither torch nor httpx.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from aloe_cli.errors import AloeError
from aloe_cli.modeling.backends import GenerationBackend

BACKENDS = ("hf", "openai")


@dataclass(frozen=True)
class BackendConfig:
    model: str  # hf: a model folder or Hub id; openai: the model name the server serves
    backend: str | None = None  # "hf" | "openai"; None: openai when base_url is given, else hf
    # openai
    base_url: str | None = None
    api_key_env: str | None = None  # None: $OPENAI_API_KEY when set, else no key
    concurrency: int = 64
    timeout: float = 60.0
    max_retries: int = 5
    retry_backoff: float = 1.0
    # hf
    batch_size: int = 8
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    @property
    def kind(self) -> str:
        return self.backend or ("openai" if self.base_url else "hf")


def build_backend(config: BackendConfig, *, on_ready: Callable[[str], None] | None = None) -> GenerationBackend:
    """The backend `config` asks for. Bad options (a missing model folder, a bad URL, an unset key
    variable) raise AloeError now, before any record is read."""
    announce = on_ready or (lambda description: None)
    if config.kind not in BACKENDS:
        raise AloeError(f"--backend must be one of {', '.join(BACKENDS)}, got {config.kind!r}")
    if config.kind == "hf":
        if config.base_url:
            raise AloeError("--base-url is for --backend openai")
        return _hf_backend(config, announce)
    return _openai_backend(config, announce)


def _hf_backend(config: BackendConfig, announce: Callable[[str], None]) -> GenerationBackend:
    from aloe_cli.modeling.backends.hf import HFBackend
    from aloe_cli.modeling.loading import ModelSpec, check_model_reference, load_model

    check_model_reference(config.model)
    spec = ModelSpec(config.model, device=config.device, dtype=config.dtype,
                     trust_remote_code=config.trust_remote_code, attn_implementation=config.attn_implementation)

    def load():
        loaded = load_model(spec)
        announce(loaded.describe())
        return loaded

    return HFBackend(load, batch_size=config.batch_size)


def _openai_backend(config: BackendConfig, announce: Callable[[str], None]) -> GenerationBackend:
    from aloe_cli.modeling.backends.openai import DEFAULT_BASE_URL, OpenAIBackend, OpenAIConfig, api_key_from_env

    key_variable, api_key = api_key_from_env(config.api_key_env)
    backend = OpenAIBackend(OpenAIConfig(
        model=config.model, base_url=config.base_url or DEFAULT_BASE_URL, concurrency=config.concurrency,
        timeout=config.timeout, max_retries=config.max_retries, retry_backoff=config.retry_backoff,
        api_key_env=key_variable), api_key)
    announce(backend.describe())
    return backend


__all__ = ["BACKENDS", "BackendConfig", "build_backend"]
