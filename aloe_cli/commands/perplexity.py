"""aloe perplexity: flag trivial (too predictable) and noisy (too surprising) answers.

Scores the assistant turns of every record with a model (conditioned on the
prompt and images), writes aloe.perplexity = {value, tokens, per_turn}, and
with a thresholds file rejects answers below a source's min (trivial_answer)
or above its max (noisy_answer). Without a thresholds file nothing is dropped.

Examples:

    # the distributions first: annotate, keep everything, plot per source
    aloe perplexity -i train.jsonl --model Qwen/Qwen2-VL-2B-Instruct \\
        --keep-all --plot ppl_plots/ -o train.ppl.jsonl

    # then filter with per-source thresholds (absolute, or percentiles
    # such as p2/p98)
    aloe perplexity -i train.jsonl --model Qwen/Qwen2-VL-2B-Instruct \\
        --thresholds thresholds.yaml -o kept.jsonl \\
        --rejects dropped.jsonl --report ppl.json

    # other thresholds later, without recomputing (aloe.perplexity holds
    # the values)
    aloe perplexity -i train.ppl.jsonl --model Qwen/Qwen2-VL-2B-Instruct \\
        --reuse --thresholds t.yaml -o kept.jsonl

    # SLURM array, one GPU per task
    aloe perplexity -i train.jsonl --model M --keep-all \\
        -o ppl.$SLURM_ARRAY_TASK_ID.jsonl

thresholds.yaml:

    default: {min: p2, max: p98}
    slake:   {min: 1.5, max: 40}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.options import (
    AttnImplementationOpt,
    BatchSizeOpt,
    BboxFormat,
    BboxFormatOpt,
    DeviceOpt,
    DtypeOpt,
    ImageRootOpt,
    InputOpt,
    KeepAllOpt,
    KeepDicomBytesOpt,
    ModelOpt,
    OnError,
    OnErrorOpt,
    OutputOpt,
    RejectsOpt,
    ReportOpt,
    ResumeOpt,
    ShardOpt,
    TrustRemoteCodeOpt,
    command_app,
)

app = command_app()


@app.command(help=__doc__, no_args_is_help=False)
def perplexity(
    model: ModelOpt,
    thresholds: Annotated[Path | None, typer.Option(
        "--thresholds", help="YAML/JSON per-source {min, max}: numbers or percentiles (p2, p98); a 'default' "
                             "entry covers other sources. Without it nothing is dropped.")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write one histogram PNG per source (thresholds drawn) into this folder.")] = None,
    ifd: Annotated[bool, typer.Option(
        "--ifd", help="Also score each answer without its prompt and write aloe.perplexity.ifd = "
                      "ppl(answer | prompt) / ppl(answer).")] = False,
    max_tokens: Annotated[int | None, typer.Option(
        "--max-tokens", min=1, help="Records longer than this (tokens, images included) are errors "
                                    "(reason too_long). Default: no limit.")] = None,
    reuse: Annotated[bool, typer.Option(
        "--reuse", help="Keep values already in aloe.perplexity (from an earlier run) instead of recomputing, when "
                        "their recorded model (aloe.perplexity.model) is this --model; others are recomputed. The "
                        "model is loaded only if some record needs scoring.")] = False,
    input: InputOpt = None,
    output: OutputOpt = "-",
    rejects: RejectsOpt = None,
    report: ReportOpt = None,
    image_root: ImageRootOpt = None,
    bbox_format: BboxFormatOpt = BboxFormat.xyxy,
    keep_dicom_bytes: KeepDicomBytesOpt = False,
    batch_size: BatchSizeOpt = 16,
    shard: ShardOpt = None,
    resume: ResumeOpt = False,
    on_error: OnErrorOpt = OnError.fail,
    keep_all: KeepAllOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustRemoteCodeOpt = False,
    attn_implementation: AttnImplementationOpt = None,
) -> None:
    from aloe_cli import console
    from aloe_cli.commands._common import check_io, resolve_shard, run_data_command, shard_done
    from aloe_cli.data.records import RecordDefaults
    from aloe_cli.data.stage import RunConfig
    from aloe_cli.filters.distribution_plots import plot_histograms
    from aloe_cli.filters.perplexity import PerplexityConfig, PerplexityStage, percentile_rows
    from aloe_cli.filters.thresholds import load_thresholds
    from aloe_cli.modeling.loading import ModelSpec, check_model_reference, load_model
    from aloe_cli.plotting import plot_folder, require_matplotlib

    # Everything that can be wrong with the options is checked before any model is loaded.
    chosen_shard = resolve_shard(shard)
    if shard_done("perplexity", chosen_shard, report, resume):
        return
    check_io(input, output=output, rejects=rejects, report=report)
    bounds = load_thresholds(thresholds, "perplexity") if thresholds is not None else None
    if plot is not None:
        require_matplotlib()
        plot_folder(plot)  # a file in the way fails now, not after the scoring
    check_model_reference(model)
    spec = ModelSpec(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                     attn_implementation=attn_implementation)

    def load():
        loaded = load_model(spec)
        console.log(f"aloe perplexity: scoring with {loaded.describe()}")
        return loaded

    stage = PerplexityStage(load, PerplexityConfig(batch_size=batch_size, ifd=ifd, max_tokens=max_tokens,
                                                   reuse=reuse), bounds, model_name=model)
    config = RunConfig(shard=chosen_shard, keep_all=keep_all, on_error=on_error.value)
    summary = run_data_command(stage, input, image_root=image_root, output=output, rejects=rejects, report=report,
                               config=config, defaults=RecordDefaults(bbox_format=bbox_format.value,
                                                                      keep_dicom_bytes=keep_dicom_bytes),
                               images_first=not reuse)  # reused records need no image

    rows = percentile_rows(summary.extra)
    if rows:
        console.print_table("answer perplexity per source", ["source", "n", "p1", "p5", "p50", "p95", "p99",
                                                             "min", "max"], rows)
    extra = summary.extra
    console.log(f"  {extra['tokens_scored']} answer token(s) scored in {extra['records_scored']} record(s)"
                + (f"; --reuse: {extra['records_reused']} value(s) reused, "
                   f"{extra['records_recomputed_other_model']} recomputed (recorded by another model or none)"
                   if reuse else ""))
    if plot is not None:
        written = plot_histograms(stage.distribution, stage.resolved_thresholds(), plot)
        console.log(f"  wrote {len(written)} histogram(s) to {plot}")

