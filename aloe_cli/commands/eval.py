"""aloe eval: medical and general benchmarks, an LLM judge for open answers, the adversarial table.

Greedy decoding; multiple-choice and yes/no answers scored under two protocols, both always reported:
`accuracy` by VLMEvalKit's exact matching at a pinned commit (comparable with published baselines) and
`accuracy_aloe` by aloe's answer extraction (docs/eval.md lists both sets of rules). --protocol chooses
whose prompt is sent (default vlmevalkit: the prompt VLMEvalKit sends Qwen2-VL for that dataset).
Open-ended answers graded 0 / 0.5 / 1 by a judge (a vision-language judge also sees the images), or,
without --judge, by exact match (not judged); with --perturb every
item is asked again under each perturbation and the robustness table reports accuracy per
perturbation for the classification (task cls) and detection (task det) items.

Writes, under -o DIR: <model>/<benchmark>/predictions.jsonl (one line per item and perturbation),
<model>/scores.json, <model>/<benchmark>/acc.csv (per split and category), and results.md / results.csv
(one row per model; a later run with another --model adds its row). The published benchmarks are
recognised by name or VLMEvalKit file name (PathMMU_TEST.tsv, MMMU_DEV_VAL.tsv, ...) and come first.

Examples:

    # a local model, batched greedy generation
    aloe eval --model Qwen/Qwen2-VL-7B-Instruct --benchmark PathMMU.tsv \\
        --benchmark probmed.jsonl -o results/

    # a served model (vLLM / SGLang), a served judge for the open-ended
    # set, the robustness table
    aloe eval --model aloe-72b --backend openai \\
        --base-url http://gpu-node:8000/v1 --concurrency 64 \\
        --benchmark SLAKE=slake_open.jsonl \\
        --benchmark adv=adversarial.jsonl --perturb base,cap,pmt,syc,leg \\
        --judge Qwen/Qwen2.5-VL-72B-Instruct --judge-backend openai \\
        --judge-base-url http://judge:8000/v1 -o results/

    # text-only benchmarks through lm-evaluation-harness
    # (pip install 'aloe-cli[eval]')
    aloe eval --model runs/stage2 \\
        --lm-eval-tasks medqa_4options,medmcqa,pubmedqa -o results/

    # the tables again, from the saved scores (all: cls Leg, det Region too)
    aloe eval --table results/
    aloe eval --table results/ --robustness-columns all
    # scores again under new rules, no model
    aloe eval --rescore results/m/PathMMU/predictions.jsonl -o rescored/
    aloe eval --show-judge-prompt    # the judge's rubric
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.modeling.backends.factory import BackendConfig
from aloe_cli.options import (
    ImageRootOpt,
    MaxNewTokensOpt,
    OnError,
    OnErrorCountedOpt,
    command_app,
    not_empty,
    with_backend_options,
)
from aloe_cli.perturb.names import EVAL_NAMES

app = command_app()


class Protocol(str, Enum):
    vlmevalkit = "vlmevalkit"
    aloe = "aloe"


def _check_perturb(value: str | None) -> str | None:
    from aloe_cli.errors import UsageError
    from aloe_cli.evaluation.run import parse_perturbations

    if value is not None:
        not_empty(value)
        try:
            parse_perturbations(value)
        except UsageError as error:
            raise typer.BadParameter(str(error)) from None
    return value


def _robustness_columns(value: str):
    from aloe_cli.errors import UsageError
    from aloe_cli.evaluation.results import parse_robustness_columns

    try:
        return parse_robustness_columns(not_empty(value))
    except UsageError as error:
        raise typer.BadParameter(str(error)) from None


@app.command(help=__doc__, no_args_is_help=True)
@with_backend_options(judge=True, timeout=120.0, batch_size=16)
def eval(  # noqa: A001 - the command's name
    model: Annotated[list[str] | None, typer.Option(
        "--model", callback=not_empty,
        help="Model folder or Hub id (hf), or the served model's name (openai); NAME=MODEL sets the "
             "row's name in the tables. Repeatable.")] = None,
    benchmark: Annotated[list[str] | None, typer.Option(
        "--benchmark", callback=not_empty,
        help="VLMEvalKit .tsv or .jsonl items (a FIFO, - or /dev/stdin is read once); NAME=FILE sets the "
             "benchmark's name (default: the file's stem). Repeatable.")] = None,
    output: Annotated[str | None, typer.Option("-o", "--output", callback=not_empty, help="Results folder.")] = None,
    perturb: Annotated[str | None, typer.Option(
        "--perturb", callback=_check_perturb,
        help=f"Also ask every item under these perturbations: {','.join(EVAL_NAMES)} (cap and leg need an "
             "image, region a box in the question or answer).")] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="First N items of each benchmark.")] = None,
    protocol: Annotated[Protocol, typer.Option(
        "--protocol", help="Whose prompt is sent: vlmevalkit (VLMEvalKit's for Qwen2-VL, comparable with "
                           "published baselines) or aloe. Both are always scored.")] = Protocol.vlmevalkit,
    max_new_tokens: MaxNewTokensOpt = 128,
    judge: Annotated[str | None, typer.Option(
        "--judge", callback=not_empty,
        help="Judge model for open-ended items (folder / Hub id, or served name).")] = None,
    judge_parse_retries: Annotated[int, typer.Option(
        "--judge-parse-retries", min=0, max=100,
        help="Ask the judge again (sampling) when its verdict cannot be read.")] = 2,
    judge_vision: Annotated[bool | None, typer.Option(
        "--judge-vision/--no-judge-vision",
        help="Show the judge the item's images. Default: --judge-backend hf when the judge model has a vision "
             "part; openai on (a vision-language judge; a text-only server needs --no-judge-vision).")] = None,
    show_judge_prompt: Annotated[bool, typer.Option(
        "--show-judge-prompt", help="Print the judge's rubric and exit.")] = False,
    table: Annotated[str | None, typer.Option(
        "--table", callback=not_empty,
        help="Print the tables of a results folder from its saved scores and exit.")] = None,
    robustness_columns: Annotated[str, typer.Option(
        "--robustness-columns", callback=_robustness_columns,
        help="Adversarial table columns: published (cls Base Cap Pmt Syc, det Base Cap Pmt Syc Leg), all "
             "(every cell measured), or cells such as cls:leg,det:region.")] = "published",
    rescore: Annotated[list[str] | None, typer.Option(
        "--rescore", callback=not_empty,
        help="Re-extract and re-score saved predictions.jsonl (no model); writes under -o "
             "(default: <its folder>/rescored).")] = None,
    lm_eval_tasks: Annotated[str | None, typer.Option(
        "--lm-eval-tasks", callback=not_empty,
        help="Comma-separated lm-evaluation-harness tasks run on the loaded model (needs the "
             "[eval] extra); their scores join the same table.")] = None,
    lm_eval_include: Annotated[Path | None, typer.Option(
        "--lm-eval-include", exists=True, file_okay=False,
        help="Folder of extra lm-eval task YAML files (local tasks).")] = None,
    cache: Annotated[str | None, typer.Option(
        "--cache", callback=not_empty,
        help="JSONL cache of replies (the model's and the judge's): an interrupted run resumes "
             "without asking again.")] = None,
    image_root: ImageRootOpt = None,
    on_error: OnErrorCountedOpt = OnError.fail,
    backend_config: BackendConfig = None,
    judge_config: BackendConfig = None,
) -> None:
    from aloe_cli.commands import _eval_run as run
    from aloe_cli.evaluation.run import EvalRequest

    if show_judge_prompt:
        from aloe_cli.evaluation.judge import JUDGE_RUBRIC

        print(JUDGE_RUBRIC, end="")
        return
    if table is not None:
        run.print_table(Path(table), robustness_columns)
        return
    if rescore:
        run.rescore(rescore, Path(output) if output else None, on_error.value)
        return
    if not model:
        raise typer.BadParameter("is required (or use --table, --rescore, --show-judge-prompt)", param_hint="--model")
    if not benchmark and not lm_eval_tasks:
        raise typer.BadParameter("give at least one --benchmark (or --lm-eval-tasks)", param_hint="--benchmark")
    if output is None:
        raise typer.BadParameter("is required (the results folder)", param_hint="-o/--output")
    run.evaluate(EvalRequest(
        models=model, benchmarks=benchmark or [], output=Path(output), perturb=perturb, limit=limit,
        protocol=protocol.value,
        max_new_tokens=max_new_tokens, on_error=on_error.value, image_root=image_root,
        lm_eval_tasks=lm_eval_tasks, lm_eval_include=lm_eval_include, cache=Path(cache) if cache else None,
        backend=backend_config, judge=judge, judge_backend=judge_config, judge_parse_retries=judge_parse_retries,
        judge_vision=judge_vision, robustness_columns=robustness_columns))
