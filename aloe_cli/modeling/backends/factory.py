"""One backend from the options every generating command shares (`--backend`, `--base-url`, ...).

    config = BackendConfig(model="Qwen/Qwen2-VL-7B-Instruct", backend="openai", base_url="http://judge:8000/v1")
    backend = build_backend(config, on_ready=log)       # on_ready(description) once it can serve

`backend=None` picks `openai` when a base URL is given, else `hf`. The hf backend loads its model on the first
request that needs one, so a run answered entirely from a response cache never loads a model; `LazyBackend`
defers building the backend itself to its first use. Every field but `model` is a command-line flag of
`score`, `eval` and `infer` (its metadata: help text, bounds, choices, a check); `aloe_cli.options` generates
those flags, and eval's `--judge-*` twins, from here. Importing this module imports neither torch nor httpx.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from aloe_cli.errors import AloeError, UsageError
from aloe_cli.modeling.backends import GenerationBackend

BACKENDS = ("hf", "openai")


def _check_url(value: str) -> None:
    from aloe_cli.modeling.backends.openai import chat_completions_url

    chat_completions_url(value)


def _check_device(value: str) -> None:
    from aloe_cli.modeling.loading import check_device_name

    check_device_name(value)


def _check_dtype(value: str) -> None:
    from aloe_cli.modeling.loading import check_dtype_name

    check_dtype_name(value)


def option(help: str, *, minimum: float | None = None, maximum: float | None = None,
           choices: tuple[str, ...] | None = None, check: Callable[[str], None] | None = None,
           judge_help: str | None = None, own: bool = False) -> dict:
    """Field metadata for the flag: help text, bounds, choices, a check raising AloeError for a value no run
    can use. The judge's twin (`--judge-NAME`) takes the model's value unless given, except for an `own` field
    (which server, which key, whether to run its code: the judge's own decision); `judge_help` replaces the
    twin's default note."""
    return {"help": help, "min": minimum, "max": maximum, "choices": choices, "check": check,
            "judge_help": judge_help, "own": own}


@dataclass(frozen=True)
class BackendConfig:
    model: str  # hf: a model folder or Hub id; openai: the model name the server serves
    backend: str | None = field(default=None, metadata=option(
        "hf: a local model, batched generation. openai: an OpenAI-compatible server (vLLM, SGLang, TGI). "
        "Default: openai when --base-url is given, else hf.", choices=BACKENDS, own=True,
        judge_help="default: openai when --judge-base-url is given, else hf"))
    # openai
    base_url: str | None = field(default=None, metadata=option(
        "openai: the server's URL, e.g. http://localhost:8000/v1 (the default).", check=_check_url, own=True,
        judge_help="the judge server's URL"))
    api_key_env: str | None = field(default=None, metadata=option(
        "openai: environment variable holding the API key (never printed). Default: OPENAI_API_KEY when set, "
        "else no key.", own=True, judge_help="default: OPENAI_API_KEY when set, else no key"))
    concurrency: int = field(default=64, metadata=option("openai: requests in flight.", minimum=1, maximum=4096))
    timeout: float = field(default=60.0, metadata=option(
        "openai: seconds one attempt may take, from sending to the last byte of the reply; then it is retried.",
        minimum=0.01))
    max_retries: int = field(default=5, metadata=option(
        "openai: retries for 408/429/5xx, network errors and timeouts.", minimum=0, maximum=100))
    retry_backoff: float = field(default=1.0, metadata=option(
        "openai: first wait between retries (s); doubles each time, at least what Retry-After asks.", minimum=0.0))
    # hf
    batch_size: int = field(default=8, metadata=option("Records per batch.", minimum=1))
    device: str = field(default="auto", metadata=option(
        "auto (cuda when available, else cpu), cpu, cuda or cuda:N.", check=_check_device))
    dtype: str = field(default="auto", metadata=option(
        "Weights/compute dtype: auto, bfloat16, float16 or float32 (bf16, fp16, fp32 also read). auto: bfloat16 "
        "on a GPU, float32 on the CPU.", check=_check_dtype))
    trust_remote_code: bool = field(default=False, metadata=option(
        "Allow the checkpoint to run its own Python code (off by default).", own=True))
    attn_implementation: str | None = field(default=None, metadata=option(
        "Passed to transformers (eager, sdpa, flash_attention_2, ...). Default: flash_attention_2 when installed "
        "and on a GPU in half precision, else sdpa."))

    @property
    def kind(self) -> str:
        return self.backend or ("openai" if self.base_url else "hf")

    @property
    def items_at_once(self) -> int:
        """Items to hand the backend at once (the stage runner's batch): enough to keep every batch or
        connection busy."""
        if self.kind == "openai":
            return max(self.batch_size, self.concurrency * 4)
        return self.batch_size * 4


def check_config(config: BackendConfig, prefix: str = "") -> None:
    """Options that contradict each other are a usage error naming the flag (`prefix` "judge-" for the judge's):
    checked once, before any record is read or model loaded."""
    if config.kind not in BACKENDS:
        raise UsageError(f"must be one of {', '.join(BACKENDS)}, got {config.kind!r}", f"--{prefix}backend")
    if config.kind == "hf" and config.base_url:
        raise UsageError(f"is for --{prefix}backend openai", f"--{prefix}base-url")


def check_backend(config: BackendConfig, prefix: str = "") -> None:
    """Everything about a backend that can be known before any work, each found once: the options agree; hf: the
    model folder is there, or the Hub id can be loaded (`modeling.hub`); openai: the key variable is set and the
    server can be connected to.
    A one-line error naming the flag, in seconds, instead of a first benchmark line failing after every retry."""
    check_config(config, prefix)
    if config.kind == "hf":
        from aloe_cli.modeling.loading import check_model_reference

        check_model_reference(config.model)
    else:
        from aloe_cli.modeling.backends.openai import DEFAULT_BASE_URL, api_key_from_env

        try:
            api_key_from_env(config.api_key_env)  # an unset key variable first: it needs no network to tell
        except AloeError as error:
            raise AloeError(str(error).replace("--api-key-env", f"--{prefix}api-key-env", 1)) from None
        check_server(config.base_url or DEFAULT_BASE_URL, f"--{prefix}base-url")


SERVER_PROBE_TIMEOUT = 10.0  # seconds to open a connection to a server
_servers_seen: set[str] = set()


def check_server(base_url: str, flag: str = "--base-url", timeout: float = SERVER_PROBE_TIMEOUT) -> None:
    """AloeError naming `flag` and the URL unless a TCP connection to the server (or to the proxy that reaches
    it, as the client would use) opens within `timeout` seconds. No request is sent, so the server counts and
    logs nothing; whether it serves the model is its first reply's question."""
    import socket
    import urllib.request
    from urllib.parse import urlsplit

    if base_url in _servers_seen:
        return
    parts = urlsplit(base_url.strip())
    target = (parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80))
    connect, via = target, ""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(target[0]):
        proxy_parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        connect = (proxy_parts.hostname or "", proxy_parts.port or (443 if proxy_parts.scheme == "https" else 80))
        via = f" through the proxy {connect[0]}:{connect[1]}"
    try:
        with socket.create_connection(connect, timeout=timeout):
            pass
    except OSError as exc:
        reason = f"no answer in {timeout:g} s" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise AloeError(f"{flag} {base_url}: cannot connect to {target[0]}:{target[1]}{via} ({reason}); is the "
                        "server running there?") from None
    _servers_seen.add(base_url)


def build_backend(config: BackendConfig, *, on_ready: Callable[[str], None] | None = None) -> GenerationBackend:
    """The backend `config` asks for. Bad options (a missing model folder, a bad URL, an unset key
    variable) raise AloeError now, before any record is read."""
    announce = on_ready or (lambda description: None)
    check_config(config)
    if config.kind == "hf":
        return _hf_backend(config, announce)
    return _openai_backend(config, announce)


class LazyBackend:
    """A backend built on first call (a fully cached run never loads a model or opens a client), closed at
    the end by `close_if_open`. Stages that take `Callable[[], GenerationBackend]` call it."""

    def __init__(self, factory: Callable[[], GenerationBackend]):
        self._factory = factory
        self._backend: GenerationBackend | None = None

    def __call__(self) -> GenerationBackend:
        if self._backend is None:
            self._backend = self._factory()
        return self._backend

    def close_if_open(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


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


__all__ = ["BACKENDS", "BackendConfig", "LazyBackend", "build_backend", "check_backend", "check_config", "check_server",
           "option"]
