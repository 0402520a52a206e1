"""Option types shared by every command (typer `Annotated` aliases).

Commands declare e.g. `input: InputOpt = None` so the same flag has the same
name, short form and help text everywhere.
"""

from __future__ import annotations

import math
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

# ----------------------------------------------------------------------------- checks shared by the options
# A value no command can use is a usage error (exit 2), caught while the options are parsed, before any input is
# read or any model is loaded.

def finite(value: float | None) -> float | None:
    """Callback for float options: inf and nan are never meaningful (typer's min/max let inf through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def not_empty(value):
    """Callback for text options (and lists of them): an empty or blank value is a usage error, never "the
    current folder" or "no value"."""
    values = value if isinstance(value, list) else [value]
    if any(item is not None and not str(item).strip() for item in values):
        raise typer.BadParameter("is empty")
    return value


def _check_shard(value: str | None) -> str | None:
    if value is None:
        return None
    from aloe_cli.data.shard import Shard
    from aloe_cli.errors import AloeError

    try:
        Shard.parse(value)
    except AloeError as error:
        raise typer.BadParameter(str(error).removeprefix("--shard ").removeprefix("--shard: ")) from None
    return value


def _cap_workers(value: int) -> int:
    """More worker processes than CPUs only adds forks (100000 would stall the machine): cap, with a note."""
    from aloe_cli import console
    from aloe_cli.data.shard import available_cpus

    cpus = available_cpus()
    if value > cpus:
        console.log(f"aloe: note: --workers {value} is more than the {cpus} CPU(s) this process may use; "
                    f"using {cpus}")
        return cpus
    return value


class OnError(str, Enum):
    fail = "fail"
    skip = "skip"


InputOpt = Annotated[
    list[str] | None,
    typer.Option("-i", "--input", callback=not_empty,
                 help="Input file(s) or globs (JSONL[.gz], parquet, dataset folder, VLMEvalKit TSV). Repeatable. "
                 "Default: stdin."),
]
OutputOpt = Annotated[
    str, typer.Option("-o", "--output", callback=not_empty,
                      help="Output file (.jsonl, .jsonl.gz, .parquet). Default: stdout.")
]
RejectsOpt = Annotated[
    Path | None, typer.Option("--rejects", help="Write dropped records here, each with aloe.reject = {stage, reason}.")
]
ReportOpt = Annotated[
    Path | None, typer.Option("--report", help="Write the closing summary as JSON (and, when the run finishes, "
                              "the completion marker FILE.done).")
]
ShardOpt = Annotated[
    str | None,
    typer.Option("--shard", callback=_check_shard,
                 help="Process shard K/N (0-based) of the input. Default: from SLURM_ARRAY_TASK_ID/"
                 "SLURM_ARRAY_TASK_COUNT, else 0/1."),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Skip this shard (exit 0) when its --report's completion marker "
                       "FILE.done exists: rerun a job array and only unfinished shards run.")
]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=1, callback=_cap_workers,
                      help="Worker processes for CPU-bound work; capped at the CPUs this process may use "
                      "(its CPU affinity, e.g. SLURM's --cpus-per-task), with a note.")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Records per batch.")]
OnErrorOpt = Annotated[
    OnError, typer.Option("--on-error", help="fail: stop at the first bad record (exit 1). skip: send it to --rejects.")
]
KeepAllOpt = Annotated[
    bool, typer.Option("--keep-all", help="Annotate and flag records but drop none (thresholds can be applied later).")
]
ImageRootOpt = Annotated[
    Path | None,
    typer.Option("--image-root", exists=True, file_okay=False,
                 help="Folder that relative image paths resolve against. Default: the input file's folder "
                 "(the working directory for stdin)."),
]

KeepDicomBytesOpt = Annotated[
    bool,
    typer.Option("--keep-dicom-bytes",
                 help="Pass embedded DICOM data (data URIs, parquet/dataset image bytes) through as it is, header "
                 "and patient data included. Default: its pixels are re-encoded on read as PNG, rendered like every "
                 "stage sees them (window/level, 8 bits), without the header. DICOM referenced by path stays a path."),
]

class BboxFormat(str, Enum):
    xyxy = "xyxy"
    xywh = "xywh"


BboxFormatOpt = Annotated[
    BboxFormat,
    typer.Option("--bbox-format",
                 help="Pixel boxes in objects/bbox are [x1, y1, x2, y2] (xyxy) or [x, y, w, h] (xywh). Records are "
                 "grounded (boxes -> answer text) by the first command that reads them."),
]


def command_app() -> typer.Typer:
    """The Typer app a command module registers its one command on."""
    return typer.Typer(add_completion=False, rich_markup_mode="rich", pretty_exceptions_enable=False)


# ----------------------------------------------------------------------------- model-backed commands

class Dtype(str, Enum):
    auto = "auto"
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


def _check_model(value: str) -> str:
    if not value or not value.strip():
        raise typer.BadParameter("is empty: give a model folder or a Hub id")
    return value


ModelOpt = Annotated[
    str,
    typer.Option("--model", callback=_check_model,
                 help="Model folder or Hub id (Qwen2-VL family), loaded with AutoProcessor + "
                 "AutoModelForImageTextToText."),
]
def _check_device(value: str) -> str:
    from aloe_cli.errors import AloeError
    from aloe_cli.modeling.loading import check_device_name

    try:
        return check_device_name(value)
    except AloeError as error:
        raise typer.BadParameter(str(error).removeprefix("--device ")) from None


DeviceOpt = Annotated[
    str, typer.Option("--device", callback=_check_device,
                      help="auto (cuda when available, else cpu), cpu, cuda or cuda:N.")
]
DtypeOpt = Annotated[
    Dtype, typer.Option("--dtype", help="Weights/compute dtype. auto: bfloat16 on a GPU, float32 on the CPU.")
]
TrustRemoteCodeOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Allow the checkpoint to run its own Python code (off by default).")
]
AttnImplementationOpt = Annotated[
    str | None,
    typer.Option("--attn-implementation", help="Passed to transformers (eager, sdpa, flash_attention_2, ...). "
                 "Default: flash_attention_2 when installed and on a GPU in half precision, else sdpa."),
]


# ----------------------------------------------------------------------------- generating commands (score, eval, infer)

class Backend(str, Enum):
    hf = "hf"
    openai = "openai"


def _check_base_url(value: str | None) -> str | None:
    """A malformed --base-url is a usage error (exit 2), caught before anything is read or loaded."""
    if value is None:
        return None
    from aloe_cli.errors import AloeError
    from aloe_cli.modeling.backends.openai import chat_completions_url

    try:
        chat_completions_url(value)
    except AloeError as error:
        raise typer.BadParameter(str(error).removeprefix("--base-url ")) from None
    return value


BackendOpt = Annotated[
    Backend | None,
    typer.Option("--backend", help="hf: a local model, batched generation. openai: an OpenAI-compatible server "
                 "(vLLM, SGLang, TGI). Default: openai when --base-url is given, else hf."),
]
BaseUrlOpt = Annotated[
    str | None,
    typer.Option("--base-url", callback=_check_base_url,
                 help="openai: the server's URL, e.g. http://localhost:8000/v1 (the default).")
]
ApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option("--api-key-env", callback=not_empty,
                 help="openai: environment variable holding the API key (never printed). "
                 "Default: OPENAI_API_KEY when set, else no key."),
]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", min=1, max=4096, help="openai: requests in flight.")]
TimeoutOpt = Annotated[
    float,
    typer.Option("--timeout", min=0.01, callback=finite,
                 help="openai: seconds one attempt may take, from sending to the last byte of the reply; then it is "
                 "retried."),
]
MaxRetriesOpt = Annotated[
    int, typer.Option("--max-retries", min=0, max=100,
                      help="openai: retries for 408/429/5xx, network errors and timeouts.")
]
RetryBackoffOpt = Annotated[
    float,
    typer.Option("--retry-backoff", min=0.0, callback=finite,
                 help="openai: first wait between retries (s); doubles each time, at least what Retry-After asks."),
]
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", min=1, max=1 << 20, help="Longest reply, in tokens.")
]
# A second model that grades the first one's answers (aloe eval's judge for open-ended items).
JudgeBackendOpt = Annotated[
    Backend | None,
    typer.Option("--judge-backend", help="The judge's backend, hf or openai. Default: openai when --judge-base-url "
                 "is given, else hf."),
]
JudgeBaseUrlOpt = Annotated[
    str | None,
    typer.Option("--judge-base-url", callback=_check_base_url, help="openai: the judge server's URL."),
]
JudgeApiKeyEnvOpt = Annotated[
    str | None,
    typer.Option("--judge-api-key-env", callback=not_empty,
                 help="openai: environment variable holding the judge server's API key. "
                 "Default: OPENAI_API_KEY when set, else no key."),
]
