"""aloe infer: answer a question about images, or every record of a file; grounded boxes in pixels.

With a question on the command line the answer is printed. With -i every record (JSONL, parquet,
TSV, ...) is answered in batches and written in input order, streaming, with aloe.infer = {"text":
..., "boxes": [{"label", "box" (0-1000), "image", "pixels" (original image)}]}. Greedy by default.

Examples:

    aloe infer --model Qwen/Qwen2-VL-7B-Instruct --image scan.png \\
        "What abnormality do you see?"
    aloe infer --model M --image a.png --image b.png \\
        "Compare the two scans." --system "You are a radiologist."
    aloe infer --model M -i prompts.jsonl --draw boxes/ > answers.jsonl
    aloe infer --model served-name --backend openai \\
        --base-url http://gpu:8000/v1 -i prompts.jsonl -o out.jsonl
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from aloe_cli.modeling.backends.factory import BackendConfig
from aloe_cli.options import (
    ImageRootOpt,
    InputOpt,
    KeepDicomBytesOpt,
    MaxNewTokensOpt,
    OnError,
    OnErrorOpt,
    OutputOpt,
    RejectsOpt,
    ReportOpt,
    ShardOpt,
    command_app,
    finite,
    not_empty,
    with_backend_options,
)

app = command_app()


@app.command(help=__doc__, no_args_is_help=True)
@with_backend_options(timeout=120.0, batch_size=8)
def infer(
    question: Annotated[str | None, typer.Argument(
        callback=not_empty, help="The question (omit it to answer the records of -i).")] = None,
    model: Annotated[str | None, typer.Option(
        "--model", callback=not_empty,
        help="Model folder or Hub id (hf), or the served model's name (openai).")] = None,
    image: Annotated[list[str] | None, typer.Option(
        "--image", callback=not_empty,
        help="An image for the question (path, DICOM, data URI). Repeatable, in order.")] = None,
    system: Annotated[str | None, typer.Option(
        "--system", callback=not_empty, help="System message before every prompt.")] = None,
    draw: Annotated[str | None, typer.Option(
        "--draw", callback=not_empty,
        help="Save each image with the answer's boxes and labels drawn, into this folder.")] = None,
    max_new_tokens: MaxNewTokensOpt = 512,
    temperature: Annotated[float, typer.Option(
        "--temperature", min=0.0, max=2.0, callback=finite, help="0: greedy; at most 2 (the OpenAI API's range).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2 ** 63 - 1, help="Sampling seed.")] = 0,
    input: InputOpt = None,
    output: OutputOpt = "-",
    rejects: RejectsOpt = None,
    report: ReportOpt = None,
    image_root: ImageRootOpt = None,
    keep_dicom_bytes: KeepDicomBytesOpt = False,
    shard: ShardOpt = None,
    on_error: OnErrorOpt = OnError.fail,
    backend_config: BackendConfig = None,
) -> None:
    from aloe_cli.commands import _infer_run

    if not model:
        raise typer.BadParameter("is required", param_hint="--model")
    if question is None and not input:
        raise typer.BadParameter("give a question, or records with -i", param_hint="QUESTION")
    if question is not None and input:
        raise typer.BadParameter("a question on the command line and -i do not go together", param_hint="-i")
    if image and question is None:
        raise typer.BadParameter("goes with a question on the command line", param_hint="--image")
    _infer_run.infer(_infer_run.InferRequest(
        question=question, images=image or [], system=system, draw=Path(draw) if draw else None, inputs=input,
        output=output, keep_dicom_bytes=keep_dicom_bytes,
        rejects=rejects, report=report, image_root=image_root, shard=shard, on_error=on_error.value,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
        backend=replace(backend_config, model=model)))
