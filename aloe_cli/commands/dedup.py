"""aloe dedup: remove training records whose images leak from evaluation sets.

Examples:

    # drop every training record that shares an image (pHash) with a benchmark
    aloe dedup -i train.jsonl --against vqa_rad.tsv \\
        --against slake_test.jsonl -o clean.jsonl \\
        --rejects leaks.jsonl --report dedup.json

    # near-duplicates too (Hamming distance <= 4), and repeats in the input
    aloe dedup -i 'shards/*.jsonl.gz' --against eval.tsv \\
        --max-distance 4 --within --workers 8

    # hash the benchmarks once, then let every SLURM array task load the index
    aloe dedup --against vqa_rad.tsv --against pmc_vqa.tsv \\
        --save-index eval.idx
    aloe dedup -i train.jsonl --against eval.idx \\
        --shard $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT

    # a job array that reruns only the shards without a completion marker,
    # then one summary
    aloe dedup -i 'raw/*.jsonl.gz' --against eval.idx \\
        -o clean/$SLURM_ARRAY_TASK_ID.jsonl.gz \\
        --report reports/$SLURM_ARRAY_TASK_ID.json --resume
    aloe report merge reports/*.json -o dedup.json

    # in a pipe
    cat train.jsonl | aloe dedup --against eval.tsv | aloe score ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.options import (
    BatchSizeOpt,
    BboxFormat,
    BboxFormatOpt,
    ImageRootOpt,
    InputOpt,
    KeepAllOpt,
    KeepDicomBytesOpt,
    OnError,
    OnErrorOpt,
    OutputOpt,
    RejectsOpt,
    ReportOpt,
    ResumeOpt,
    ShardOpt,
    WorkersOpt,
    command_app,
)

app = command_app()


@app.command(help=__doc__, no_args_is_help=False)
def dedup(
    against: Annotated[list[str] | None, typer.Option(
        "--against",
        help="Evaluation set (TSV, JSONL, parquet, dataset folder) or a saved .idx index. Repeatable.")] = None,
    hash_kind: Annotated[str, typer.Option("--hash", help="Perceptual hash: phash (default, bit-identical to "
                                                            "imagehash.phash), dhash, ahash or whash.")] = "phash",
    max_distance: Annotated[int, typer.Option("--max-distance", min=0, max=16,
                                              help="Also catch near-duplicates within this Hamming distance.")] = 0,
    within: Annotated[bool, typer.Option("--within", help="Also drop repeated images inside the training input "
                                                           "(first occurrence kept).")] = False,
    fast: Annotated[bool, typer.Option("--fast", help="Hash JPEGs from a reduced-size decode (faster; both sides "
                                                       "of a comparison must use it).")] = False,
    save_index: Annotated[Path | None, typer.Option("--save-index", help="Write the evaluation hash index "
                                                                            "here (.idx) for later --against.")] = None,
    input: InputOpt = None,
    output: OutputOpt = "-",
    rejects: RejectsOpt = None,
    report: ReportOpt = None,
    image_root: ImageRootOpt = None,
    bbox_format: BboxFormatOpt = BboxFormat.xyxy,
    keep_dicom_bytes: KeepDicomBytesOpt = False,
    workers: WorkersOpt = 1,
    batch_size: BatchSizeOpt = 512,
    shard: ShardOpt = None,
    resume: ResumeOpt = False,
    on_error: OnErrorOpt = OnError.fail,
    keep_all: KeepAllOpt = False,
) -> None:
    from aloe_cli import console
    from aloe_cli.commands._common import check_io, resolve_shard, run_data_command, shard_done
    from aloe_cli.data.records import RecordDefaults
    from aloe_cli.data.stage import RunConfig
    from aloe_cli.filters.dedup import INDEX_SUFFIX, DedupStage, build_eval_index
    from aloe_cli.filters.hash_index import HASH_KINDS
    from aloe_cli.filters.hashing import Hasher

    against = against or []
    if hash_kind not in HASH_KINDS:
        raise typer.BadParameter(f"must be one of {', '.join(HASH_KINDS)}", param_hint="--hash")
    if not against and not within:
        raise typer.BadParameter("nothing to compare against: give --against and/or --within", param_hint="--against")
    if save_index is not None and not str(save_index).endswith(INDEX_SUFFIX):
        raise typer.BadParameter(f"the index file name must end with {INDEX_SUFFIX}", param_hint="--save-index")
    if save_index is not None and not against:
        raise typer.BadParameter("needs --against (the evaluation sets to index)", param_hint="--save-index")
    config = RunConfig(batch_size=batch_size, shard=resolve_shard(shard), keep_all=keep_all, on_error=on_error.value)
    if shard_done("dedup", config.shard, report, resume):
        return
    check_io(input, output=output, rejects=rejects, report=report, read=[("--against", a) for a in against],
             written=[("--save-index", save_index)], records=bool(input) or save_index is None)

    with Hasher(hash_kind, fast=fast, workers=workers) as hasher:
        eval_index = None
        if against:
            eval_index = build_eval_index(against, hasher, max_distance=max_distance, on_error=on_error.value,
                                          batch_size=batch_size)
            for name, stats in eval_index.sets.items():
                how = f"loaded from {stats.index_file}" if stats.index_file else "hashed"
                console.log(f"aloe dedup: {name}: {stats.images} evaluation image(s) {how}"
                            + (f", {stats.unreadable} unreadable (not checked)" if stats.unreadable else ""))
        if save_index is not None:
            eval_index.save(save_index)
            console.log(f"aloe dedup: saved {len(eval_index.index)} hash(es) to {save_index}")
            if not input:
                return  # building the index was the whole job
        stage = DedupStage(hasher, eval_index, max_distance=max_distance, within=within)
        summary = run_data_command(stage, input, image_root=image_root, output=output, rejects=rejects,
                                   defaults=RecordDefaults(bbox_format=bbox_format.value,
                                                           keep_dicom_bytes=keep_dicom_bytes),
                                   report=report, config=config)
    for name, stats in summary.extra.get("eval_sets", {}).items():
        console.log(f"  leaked from {name}: {stats['leaked_records']} training record(s)")
    if within:
        console.log(f"  repeated inside the training input: {summary.extra['within_duplicates']}")
