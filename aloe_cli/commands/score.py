"""aloe score: an LVLM judge rates every sample 1-5 for coherence and relevance.

The judge sees the record's images and conversation inside a rubric
(`aloe score --show-prompt` prints it; --prompt-file replaces it) and answers
with a score and a one-sentence reason, written to aloe.score = {value, reason,
judge}. Records below their source's min score (default 3) are rejected as
low_score; replies that cannot be parsed after retries as judge_unparseable.

Examples:

    # a local judge (batched greedy generation)
    aloe score -i train.jsonl --judge Qwen/Qwen2-VL-7B-Instruct --backend hf \\
        -o scored.jsonl

    # an OpenAI-compatible server (vLLM / SGLang / TGI), 64 requests in
    # flight, resumable; replies are asked for as JSON (structured output)
    # where the server supports it
    vllm serve Qwen/Qwen2-VL-72B-Instruct --port 8000 &
    aloe score -i train.jsonl --judge Qwen/Qwen2-VL-72B-Instruct \\
        --base-url http://localhost:8000/v1 --concurrency 64 \\
        --cache judge.cache.jsonl --thresholds thresholds.yaml \\
        -o kept.jsonl --rejects low.jsonl --report score.json

    # a hosted endpoint: the key is read from the named variable, never
    # printed
    aloe score -i train.jsonl --judge gpt-4o \\
        --base-url https://api.openai.com/v1 --api-key-env OPENAI_API_KEY

    # edit the rubric, then use it with --prompt-file my_rubric.txt
    aloe score --show-prompt > my_rubric.txt

thresholds.yaml:

    default: {min: 3}
    pmc_vqa: {min: 4}
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.modeling.backends.factory import BackendConfig
from aloe_cli.options import (
    BboxFormat,
    BboxFormatOpt,
    ImageRootOpt,
    InputOpt,
    KeepAllOpt,
    KeepDicomBytesOpt,
    MaxNewTokensOpt,
    OnError,
    OnErrorOpt,
    OutputOpt,
    RejectsOpt,
    ReportOpt,
    ResumeOpt,
    ShardOpt,
    command_app,
    with_backend_options,
)

app = command_app()


@app.command(help=__doc__, no_args_is_help=False)
@with_backend_options(timeout=60.0, batch_size=8)
def score(
    judge: Annotated[str | None, typer.Option(
        "--judge", help="hf: model folder or Hub id. openai: the model name the server serves.")] = None,
    parse_retries: Annotated[int, typer.Option(
        "--parse-retries", min=0, max=100,
        help="Ask again (sampling) this many times when a reply cannot be parsed.")] = 2,
    max_new_tokens: MaxNewTokensOpt = 256,
    thresholds: Annotated[Path | None, typer.Option(
        "--thresholds", help="YAML/JSON per-source {min: score}; a 'default' entry covers other sources. "
                             "Default: min 3 everywhere.")] = None,
    prompt_file: Annotated[Path | None, typer.Option(
        "--prompt-file", help="Rubric with {conversation}, {question} and/or {answer} placeholders.")] = None,
    show_prompt: Annotated[bool, typer.Option(
        "--show-prompt", help="Print the rubric (the default, or --prompt-file) and exit.")] = False,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="JSONL cache of judge replies: an interrupted run resumes without asking again.")] = None,
    input: InputOpt = None,
    output: OutputOpt = "-",
    rejects: RejectsOpt = None,
    report: ReportOpt = None,
    image_root: ImageRootOpt = None,
    bbox_format: BboxFormatOpt = BboxFormat.xyxy,
    keep_dicom_bytes: KeepDicomBytesOpt = False,
    shard: ShardOpt = None,
    resume: ResumeOpt = False,
    on_error: OnErrorOpt = OnError.fail,
    keep_all: KeepAllOpt = False,
    backend_config: BackendConfig = None,
) -> None:
    from aloe_cli import console
    from aloe_cli.commands._common import check_io, resolve_shard, run_data_command, shard_done
    from aloe_cli.data.records import RecordDefaults
    from aloe_cli.data.stage import RunConfig
    from aloe_cli.filters.judge import (
        DEFAULT_MIN_SCORE,
        MAX_SCORE,
        MIN_SCORE,
        Rubric,
        ScoreConfig,
        ScoreStage,
        default_score_thresholds,
        load_rubric,
    )
    from aloe_cli.filters.thresholds import Bounds, load_thresholds
    from aloe_cli.modeling.backends.cache import ResponseCache
    from aloe_cli.modeling.backends.factory import build_backend, check_backend

    rubric: Rubric = load_rubric(prompt_file)
    if show_prompt:
        print(rubric.template, end="" if rubric.template.endswith("\n") else "\n")
        return
    if not judge:
        raise typer.BadParameter("is required (the judge model)", param_hint="--judge")
    chosen_shard = resolve_shard(shard)
    if shard_done("score", chosen_shard, report, resume):
        return
    check_io(input, output=output, rejects=rejects, report=report, written=[("--cache", cache)])
    bounds = (load_thresholds(thresholds, "score", allowed=("min",), default=Bounds(min=DEFAULT_MIN_SCORE),
                              value_range=(MIN_SCORE, MAX_SCORE))
              if thresholds is not None else default_score_thresholds())
    config = replace(backend_config, model=judge)
    check_backend(config)  # a missing model, an unreachable Hub or server: one line now, before any record
    generator = build_backend(config, on_ready=lambda text: console.log(f"aloe score: judging with {text}"))
    replies = ResponseCache(cache) if cache is not None else None
    if replies is not None:
        console.log(f"aloe score: {len(replies)} cached reply(ies) in {cache}"
                    + (f" ({replies.bad_lines} unreadable line(s) ignored)" if replies.bad_lines else ""))
    stage = ScoreStage(generator, ScoreConfig(judge=judge, parse_retries=parse_retries,
                                              max_new_tokens=max_new_tokens), rubric, bounds, replies)
    run = RunConfig(batch_size=config.items_at_once, shard=chosen_shard, keep_all=keep_all, on_error=on_error.value)
    summary = run_data_command(stage, input, image_root=image_root, output=output, rejects=rejects, report=report,
                               config=run, defaults=RecordDefaults(bbox_format=bbox_format.value,
                                                                   keep_dicom_bytes=keep_dicom_bytes),
                               images_first=True)
    # run_data_command closes the stage (backend, cache) when the run ends
    _print_scores(summary.extra)


def _print_scores(extra: dict) -> None:
    from aloe_cli import console

    scores = extra.get("scores", {})
    if scores:
        rows = [[source, *(histogram.get(str(s), 0) for s in range(1, 6)), histogram.get("unparseable", 0),
                 _fmt(extra["thresholds"].get(source, {}).get("min"))] for source, histogram in scores.items()]
        console.print_table("judge scores per source", ["source", "1", "2", "3", "4", "5", "unparseable", "min"],
                            rows)
    console.log(f"  {extra.get('requests', 0)} request(s) to the judge ({extra.get('parse_retries', 0)} of them "
                f"retries after an unparseable reply, {extra.get('request_failures', 0)} failed after their "
                f"retries), {extra.get('cached', 0)} reply(ies) from the cache")
    if extra.get("failed_before_request"):
        console.log(f"  {extra['failed_before_request']} record(s) failed before a request could be sent (no answer, "
                    "an image that does not load, ...): rejected, never sent")
    client = extra.get("client")
    if client:
        console.log(f"  {client['attempts']} HTTP attempt(s), {client['retries']} retried; structured output: "
                    f"{client['structured_output']}")


def _fmt(value) -> str:
    return "-" if value is None else f"{value:g}"
