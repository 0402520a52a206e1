"""aloe score: an LVLM judge rates every sample 1-5 for coherence and relevance.

The judge sees the record's images and conversation inside a rubric
(`aloe score --show-prompt` prints it; --prompt-file replaces it) and answers
with a score and a one-sentence reason, written to aloe.score = {value, reason,
judge}. Records below their source's min score (default 3) are rejected as
low_score; replies that cannot be parsed after retries as judge_unparseable.

Examples:

    # a local judge (batched greedy generation)
    aloe score -i train.jsonl --judge Qwen/Qwen2-VL-7B-Instruct --backend hf -o scored.jsonl

    # an OpenAI-compatible server (vLLM / SGLang / TGI), 64 requests in flight, resumable
    vllm serve Qwen/Qwen2-VL-72B-Instruct --port 8000 &
    aloe score -i train.jsonl --judge Qwen/Qwen2-VL-72B-Instruct --base-url http://localhost:8000/v1 \\
        --concurrency 64 --cache judge.cache.jsonl --thresholds thresholds.yaml \\
        -o kept.jsonl --rejects low.jsonl --report score.json

    # a hosted endpoint: the key is read from the named variable, never printed
    aloe score -i train.jsonl --judge gpt-4o --base-url https://api.openai.com/v1 --api-key-env OPENAI_API_KEY

    aloe score --show-prompt > my_rubric.txt      # edit, then --prompt-file my_rubric.txt

thresholds.yaml:

    default: {min: 3}
    pmc_vqa: {min: 4}
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.options import (
    AttnImplementationOpt,
    BatchSizeOpt,
    BboxFormat,
    BboxFormatOpt,
    DeviceOpt,
    Dtype,
    DtypeOpt,
    ImageRootOpt,
    InputOpt,
    KeepAllOpt,
    OnError,
    OnErrorOpt,
    OutputOpt,
    RejectsOpt,
    ReportOpt,
    ShardOpt,
    TrustRemoteCodeOpt,
    command_app,
)

app = command_app()

DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"


class Backend(str, Enum):
    hf = "hf"
    openai = "openai"


@app.command(help=__doc__, no_args_is_help=False)
def score(
    judge: Annotated[str | None, typer.Option(
        "--judge", help="hf: model folder or Hub id. openai: the model name the server serves.")] = None,
    backend: Annotated[Backend | None, typer.Option(
        "--backend", help="hf (local model) or openai (OpenAI-compatible server). Default: openai when "
                          "--base-url is given, else hf.")] = None,
    base_url: Annotated[str | None, typer.Option(
        "--base-url", help="Server URL, e.g. http://localhost:8000/v1 (the default for --backend openai).")] = None,
    api_key_env: Annotated[str | None, typer.Option(
        "--api-key-env", help=f"Environment variable holding the API key. Default: {DEFAULT_API_KEY_ENV} "
                              "when set, else no key.")] = None,
    concurrency: Annotated[int, typer.Option(
        "--concurrency", min=1, max=4096, help="openai: requests in flight.")] = 64,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.01, help="openai: seconds to wait for a request before retrying it.")] = 60.0,
    max_retries: Annotated[int, typer.Option(
        "--max-retries", min=0, help="openai: retries for 429/5xx answers, network errors and timeouts.")] = 5,
    retry_backoff: Annotated[float, typer.Option(
        "--retry-backoff", min=0.0, help="openai: first wait between retries (s); doubles each time.")] = 1.0,
    parse_retries: Annotated[int, typer.Option(
        "--parse-retries", min=0, help="Ask again (sampling) this many times when a reply cannot be parsed.")] = 2,
    max_new_tokens: Annotated[int, typer.Option(
        "--max-new-tokens", min=1, help="Longest judge reply, in tokens.")] = 256,
    thresholds: Annotated[Path | None, typer.Option(
        "--thresholds", help="YAML/JSON per-source {min: score}; a 'default' entry covers other sources. "
                             "Default: min 3 everywhere.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt-file", help="Rubric with {conversation}, {question} and/or {answer} placeholders.")] = None,
    show_prompt: Annotated[bool, typer.Option(
        "--show-prompt", help="Print the rubric (the default, or --prompt-file) and exit.")] = False,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="JSONL cache of verdicts: an interrupted run resumes without asking again.")] = None,
    input: InputOpt = None,
    output: OutputOpt = "-",
    rejects: RejectsOpt = None,
    report: ReportOpt = None,
    image_root: ImageRootOpt = None,
    bbox_format: BboxFormatOpt = BboxFormat.xyxy,
    batch_size: BatchSizeOpt = 8,
    shard: ShardOpt = None,
    on_error: OnErrorOpt = OnError.fail,
    keep_all: KeepAllOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    trust_remote_code: TrustRemoteCodeOpt = False,
    attn_implementation: AttnImplementationOpt = None,
) -> None:
    from aloe_cli import console
    from aloe_cli.commands._common import resolve_shard, run_thresholded_command
    from aloe_cli.data.io import read_items
    from aloe_cli.data.records import RecordDefaults
    from aloe_cli.data.stage import RunConfig
    from aloe_cli.filters.judge import (
        DEFAULT_MIN_SCORE,
        MAX_SCORE,
        MIN_SCORE,
        JudgeCache,
        Rubric,
        ScoreConfig,
        ScoreStage,
        default_score_thresholds,
        load_rubric,
    )
    from aloe_cli.filters.thresholds import Bounds, load_thresholds

    rubric: Rubric = load_rubric(prompt_file)
    if show_prompt:
        print(rubric.template, end="" if rubric.template.endswith("\n") else "\n")
        return
    if not judge:
        raise typer.BadParameter("is required (the judge model)", param_hint="--judge")
    kind = backend or (Backend.openai if base_url else Backend.hf)
    if kind is Backend.hf and base_url:
        raise typer.BadParameter("is for --backend openai", param_hint="--base-url")
    bounds = (load_thresholds(thresholds, "score", allowed=("min",), default=Bounds(min=DEFAULT_MIN_SCORE),
                              value_range=(MIN_SCORE, MAX_SCORE))
              if thresholds is not None else default_score_thresholds())
    if kind is Backend.hf:
        backend_factory = _hf_backend(judge, device, dtype, trust_remote_code, attn_implementation, batch_size,
                                      max_new_tokens)
        runner_batch = batch_size * 4
    else:
        backend_factory = _openai_backend(judge, base_url, api_key_env, concurrency, timeout, max_retries,
                                          retry_backoff, max_new_tokens)
        runner_batch = max(batch_size, concurrency * 4)
    verdicts = JudgeCache(cache) if cache is not None else None
    if verdicts is not None:
        console.log(f"aloe score: {len(verdicts)} cached verdict(s) in {cache}"
                    + (f" ({verdicts.bad_lines} unreadable line(s) ignored)" if verdicts.bad_lines else ""))

    stage = ScoreStage(backend_factory, ScoreConfig(judge=judge, parse_retries=parse_retries), rubric, bounds,
                       verdicts)
    config = RunConfig(batch_size=runner_batch, shard=resolve_shard(shard), keep_all=keep_all,
                       on_error=on_error.value)
    try:
        items = read_items(input, image_root, RecordDefaults(bbox_format=bbox_format.value))
        summary = run_thresholded_command(stage, items, bounds, output=output,
                                          rejects=rejects, report=report, config=config)
    finally:
        stage.close()
    _print_scores(summary.extra)


def _hf_backend(judge, device, dtype, trust_remote_code, attn_implementation, batch_size, max_new_tokens):
    from aloe_cli import console
    from aloe_cli.modeling.loading import ModelSpec, check_model_reference, load_model

    check_model_reference(judge)
    spec = ModelSpec(judge, device=device, dtype=dtype.value, trust_remote_code=trust_remote_code,
                     attn_implementation=attn_implementation)

    def factory():
        from aloe_cli.filters.judge import HFJudge, HFJudgeConfig

        loaded = load_model(spec)
        console.log(f"aloe score: judging with {loaded.describe()}")
        return HFJudge(loaded, HFJudgeConfig(batch_size=batch_size, max_new_tokens=max_new_tokens))

    return factory


def _openai_backend(judge, base_url, api_key_env, concurrency, timeout, max_retries, retry_backoff, max_new_tokens):
    from aloe_cli import console
    from aloe_cli.filters.judge import OpenAIJudge, OpenAIJudgeConfig

    key_variable, api_key = _api_key(api_key_env)
    config = OpenAIJudgeConfig(base_url=base_url or OpenAIJudgeConfig.base_url, model=judge,
                               concurrency=concurrency, timeout=timeout, max_retries=max_retries,
                               retry_backoff=retry_backoff, max_tokens=max_new_tokens, api_key_env=key_variable)
    judge_backend = OpenAIJudge(config, api_key)  # validates the URL now, before any record is read
    console.log(f"aloe score: judging with {judge} at {judge_backend.client.url}, {concurrency} request(s) in "
                f"flight" + (f", API key from ${key_variable}" if api_key else ", no API key"))
    return lambda: judge_backend


def _api_key(variable: str | None) -> tuple[str | None, str | None]:
    """(variable name, key). An explicitly named variable must be set; the default one may be absent."""
    import os

    from aloe_cli.errors import AloeError

    if variable is None:
        return DEFAULT_API_KEY_ENV, os.environ.get(DEFAULT_API_KEY_ENV) or None
    value = os.environ.get(variable)
    if not value:
        raise AloeError(f"--api-key-env {variable}: that environment variable is not set or empty")
    return variable, value


def _print_scores(extra: dict) -> None:
    from aloe_cli import console

    scores = extra.get("scores", {})
    if scores:
        rows = [[source, *(histogram.get(str(s), 0) for s in range(1, 6)), histogram.get("unparseable", 0),
                 _fmt(extra["thresholds"].get(source, {}).get("min"))] for source, histogram in scores.items()]
        console.print_table("judge scores per source", ["source", "1", "2", "3", "4", "5", "unparseable", "min"],
                            rows)
    console.log(f"  {extra.get('requests', 0)} request(s) to the judge ({extra.get('parse_retries', 0)} of them "
                f"retries after an unparseable reply), {extra.get('cached', 0)} verdict(s) from the cache")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}"
