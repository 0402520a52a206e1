"""aloe mix: a training mixture balanced by loss-contributing assistant tokens over domain x modality.

Each of the four cells (medical/multimodal, medical/text, general/multimodal,
general/text) gets its target share of the assistant tokens the SFT loss is
computed on (not of the samples, so long-answer sets do not dominate); the
sources of a cell share it by weight. Loss tokens are the tokens training
learns from (the generation blocks of the chat template training uses),
counted with the tokenizer (cached, so a changed recipe does not tokenize
again) and written to aloe.mix.loss_tokens. The output is shuffled and
deterministic for a seed.

Examples:

    # the recipe way (see docs/mix.md for the format)
    aloe mix --recipe recipe.yaml -o mixture.jsonl --report mix.json \\
        --plot mix_plots/

    # look at the plan first: counts and shares, nothing written
    aloe mix --recipe recipe.yaml --dry-run

    # inline, for small jobs: sources are the records' `source` fields,
    # domains their `domain`
    aloe mix -i med.jsonl -i general.jsonl \\
        --tokenizer Qwen/Qwen2-VL-7B-Instruct \\
        --share medical/multimodal=0.4 --share medical/text=0.2 \\
        --share general/multimodal=0.25 --share general/text=0.15 \\
        --total-samples 100000 -o mix.jsonl

    # in a pipe
    cat filtered.jsonl | aloe mix --tokenizer ./qwen2-vl \\
        --share medical/multimodal=0.6 --share general/multimodal=0.4 \\
        > mixture.jsonl

    # in a pipeline that must not go on with a mixture off its targets:
    # exit 1, nothing written
    aloe mix --recipe recipe.yaml --strict --tolerance 0.02 -o mixture.jsonl

A cell whose achieved share of loss tokens is further than the tolerance (default 0.01, one percentage point)
from its target is named in a warning (and in the report's `targets`), with its shortfall or excess; --strict
makes that an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.mixing.recipe import DEFAULT_TOLERANCE, MAX_REPEATS, MAX_SAMPLES, MAX_TOKENS
from aloe_cli.options import (
    BatchSizeOpt,
    ImageRootOpt,
    InputOpt,
    KeepDicomBytesOpt,
    OnError,
    OnErrorOpt,
    OutputOpt,
    RejectsOpt,
    ReportOpt,
    command_app,
    finite,
)

app = command_app()

_INLINE_ONLY = ("--max-repeats", "--domain", "--image-root", "--bbox-format")


@app.command(help=__doc__, no_args_is_help=False)
def mix(
    recipe_path: Annotated[Path | None, typer.Option(
        "--recipe", help="Recipe YAML: tokenizer, seed, total_samples|total_tokens, targets, sources.")] = None,
    share: Annotated[list[str] | None, typer.Option(
        "--share", help="Inline form: CELL=SHARE of loss tokens, e.g. medical/multimodal=0.4 (repeatable; "
                        "shares sum to 1).")] = None,
    tokenizer: Annotated[str | None, typer.Option(
        "--tokenizer", help="Model folder or Hub id whose tokenizer and chat template define the loss "
                            "(overrides the recipe's).")] = None,
    chat_template: Annotated[str | None, typer.Option(
        "--chat-template", help="Chat template (.jinja file) that defines the loss: its {% generation %} blocks "
                                "(a released template without them, e.g. Qwen2-VL's, counts with its family's "
                                "training template). Default: the tokenizer's.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Random seed (overrides the recipe's; "
                                                                     "default 0).")] = None,
    total_samples: Annotated[int | None, typer.Option(
        "--total-samples", min=1, max=MAX_SAMPLES,
        help="Mixture size in samples (approximate: selection is by tokens).")] = None,
    total_tokens: Annotated[int | None, typer.Option(
        "--total-tokens", min=1, max=MAX_TOKENS, help="Mixture size in loss tokens.")] = None,
    balance: Annotated[str | None, typer.Option(
        "--balance", help="loss_tokens (default) or samples (count-balanced, for comparison).")] = None,
    max_repeats: Annotated[float | None, typer.Option(
        "--max-repeats", min=1.0, max=float(MAX_REPEATS),
        help="Inline form: how often a record may be repeated to fill a cell (1 = never).")] = None,
    strict: Annotated[bool | None, typer.Option(
        "--strict/--no-strict", help="A cell that misses its target by more than --tolerance is an error (exit 1, "
                                     "no mixture written) instead of a warning (overrides the recipe's strict).",
        show_default=False)] = None,
    tolerance: Annotated[float | None, typer.Option(
        "--tolerance", min=0.0, max=1.0, callback=finite,
        help=f"How far a cell's achieved share of loss tokens may be from its target, as a share (default "
             f"{DEFAULT_TOLERANCE:g} = one percentage point; overrides the recipe's).")] = None,
    domain: Annotated[str | None, typer.Option(
        "--domain", help="Inline form: domain (medical|general) of records that have none.")] = None,
    bbox_format: Annotated[str | None, typer.Option(
        "--bbox-format", help="Inline form: pixel boxes in objects/bbox are xyxy (default) or xywh.")] = None,
    input: InputOpt = None,
    output: OutputOpt = "-",
    rejects: RejectsOpt = None,
    report: ReportOpt = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write bar charts of the shares before/after (mix_cells.png, mix_sources.png) here.")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Count and plan, print the plan (and --report/--plot), write no records.")] = False,
    cache: Annotated[Path | None, typer.Option(
        "--cache", help="Loss-token cache (SQLite). Default: the recipe's cache, else "
                        "$ALOE_CACHE_DIR/loss_tokens.sqlite (~/.cache/aloe).")] = None,
    no_cache: Annotated[bool, typer.Option("--no-cache", help="Count every record, read and write no cache.")] = False,
    image_root: ImageRootOpt = None,
    absolute_paths: Annotated[bool, typer.Option(
        "--absolute-paths", help="Write image paths as absolute paths. Default: relative to the output's folder, so "
                                 "the mixture and its images can move together (absolute when writing to "
                                 "stdout).")] = False,
    keep_dicom_bytes: KeepDicomBytesOpt = False,
    batch_size: BatchSizeOpt = 1024,
    on_error: OnErrorOpt = OnError.fail,
) -> None:
    from aloe_cli.mixing import MixOptions, build_report, load_recipe, plot_shares, run_mix
    from aloe_cli.plotting import plot_folder, require_matplotlib

    if plot is not None:
        require_matplotlib()  # before hours of counting, not after
        plot_folder(plot)
    if balance is not None and balance not in ("loss_tokens", "samples"):
        raise typer.BadParameter("must be loss_tokens or samples", param_hint="--balance")
    if domain is not None and domain not in ("medical", "general"):
        raise typer.BadParameter("must be medical or general", param_hint="--domain")
    if bbox_format is not None and bbox_format not in ("xyxy", "xywh"):
        raise typer.BadParameter("must be xyxy or xywh", param_hint="--bbox-format")
    if total_samples is not None and total_tokens is not None:
        raise typer.BadParameter("give --total-samples or --total-tokens, not both", param_hint="--total-samples")
    if recipe_path is not None:
        inline_given = [flag for flag, value in zip(("-i", "--share") + _INLINE_ONLY,
                                                    (input, share, max_repeats, domain, image_root, bbox_format))
                        if value]
        if inline_given:
            raise typer.BadParameter(f"{', '.join(inline_given)} belong(s) to the inline form; with --recipe the "
                                     "sources come from the recipe", param_hint="--recipe")
        recipe = load_recipe(recipe_path).with_overrides(
            tokenizer=tokenizer, chat_template=chat_template, seed=seed, total_samples=total_samples,
            total_tokens=total_tokens, balance=balance, strict=strict, tolerance=tolerance)
    else:
        recipe = _inline(input, share, tokenizer, chat_template, seed, total_samples, total_tokens, balance,
                         max_repeats, domain, image_root, bbox_format, bool(strict),
                         DEFAULT_TOLERANCE if tolerance is None else tolerance)

    from aloe_cli.commands._common import check_io, write_summary_report

    check_io([path for spec in recipe.sources for path in spec.paths], output=None if dry_run else output,
             rejects=None if dry_run else rejects, report=report, written=[("--cache", cache)])
    options = MixOptions(output=output, rejects=str(rejects) if rejects else None, dry_run=dry_run,
                         on_error=on_error.value, batch_size=batch_size, cache=not no_cache,
                         cache_path=str(cache) if cache else None, keep_dicom_bytes=keep_dicom_bytes,
                         absolute_paths=absolute_paths)
    from aloe_cli import console
    from aloe_cli.mixing import TargetsMissed

    try:
        result = run_mix(recipe, options, progress=console.progress)
        missed = None
    except TargetsMissed as error:  # --strict: nothing was written; the plan is still worth showing
        result, missed = error.result, error
    summary = build_report(result)
    _print_summary(summary, output)
    if report is not None:
        write_summary_report(report, summary)
    if plot is not None:
        paths = plot_shares(summary, plot)
        console.log(f"  plots: {', '.join(str(p) for p in paths)}")
    if missed is not None:
        raise missed


def _inline(inputs, shares, tokenizer, chat_template, seed, total_samples, total_tokens, balance, max_repeats,
            domain, image_root, bbox_format, strict, tolerance):
    from aloe_cli.mixing import RecipeError, inline_recipe

    if not shares:
        raise typer.BadParameter("give --recipe FILE, or the inline form: --share CELL=SHARE ... with -i inputs "
                                 "(or stdin) and --tokenizer", param_hint="--recipe")
    if tokenizer is None:
        raise typer.BadParameter("the inline form needs --tokenizer (a model folder or Hub id)",
                                 param_hint="--tokenizer")
    try:
        return inline_recipe(inputs or [], shares, tokenizer=tokenizer, chat_template=chat_template, seed=seed or 0,
                             total_samples=total_samples, total_tokens=total_tokens,
                             max_repeats=max_repeats or 1.0, domain=domain, balance=balance or "loss_tokens",
                             image_root=str(image_root) if image_root else None, bbox_format=bbox_format or "xyxy",
                             strict=strict, tolerance=tolerance)
    except RecipeError as error:  # "--share: ...", "-i: ...": a usage error of that option
        flag, _, message = str(error).partition(": ")
        raise typer.BadParameter(message, param_hint=flag if flag.startswith("-") else None) from None


def _print_summary(summary: dict, output: str) -> None:
    from aloe_cli import console
    from aloe_cli.commands._common import print_summary
    from aloe_cli.mixing.report import CELL_HEADERS, SOURCE_HEADERS, cell_rows, source_rows

    title = f"aloe mix (seed {summary['seed']}, balanced by {summary['balance'].replace('_', ' ')})"
    console.print_table(title + ": cells", CELL_HEADERS, cell_rows(summary))
    console.print_table("sources", SOURCE_HEADERS, source_rows(summary))
    for note in summary["notes"]:
        console.warn(note)
    targets = summary["targets"]
    if targets["missed"] and not targets["strict"]:  # under --strict the closing error says it
        console.warn(f"{len(targets['missed'])} cell(s) miss their target by more than the tolerance of "
                     f"{targets['tolerance'] * 100:g} percentage point(s); --strict (or strict: true) makes this "
                     "an error")
    print_summary(summary, title="aloe mix: records read (kept = available to the plan)")
    console.log(f"  of the {summary['available']} available: {summary['selected_unique']} selected, "
                f"{summary['not_selected']} not selected; {summary['samples']} samples with repeats")
    cache = summary["token_cache"]
    if cache is not None:
        console.log(f"  loss-token cache {cache['path']}: {cache['hits']} hit(s), {cache['misses']} counted")
    if summary["dry_run"]:
        console.log(f"  dry run: nothing written ({summary['samples']} samples would go to "
                    f"{'stdout' if output == '-' else output})")
