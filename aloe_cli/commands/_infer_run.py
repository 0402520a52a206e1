"""What `aloe infer` does with its options: one question, or a file of records, through the stage runner."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from aloe_cli import console
from aloe_cli.modeling.backends.factory import BackendConfig


@dataclass
class InferRequest:
    question: str | None
    images: list[str]
    system: str | None
    draw: Path | None
    inputs: list[str] | None
    output: str
    rejects: Path | None
    report: Path | None
    image_root: Path | None
    shard: str | None
    on_error: str
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int
    backend: BackendConfig
    keep_dicom_bytes: bool = False


def infer(request: InferRequest) -> None:
    from aloe_cli.commands._common import resolve_shard, run_data_command
    from aloe_cli.data.destinations import Named, check_folder
    from aloe_cli.data.io import Item, print_stdout
    from aloe_cli.data.records import RecordDefaults
    from aloe_cli.data.stage import RunConfig
    from aloe_cli.evaluation.inference import InferStage, check_chat_template
    from aloe_cli.modeling.backends import GenerationParams
    from aloe_cli.modeling.backends.factory import LazyBackend, build_backend, check_backend

    config = request.backend
    if request.draw is not None:  # before any model is loaded or record read
        check_folder(Named("--draw", str(request.draw)))
    check_backend(config)  # a missing model, an unreachable Hub or server: one line now, before any record
    if config.kind == "hf":
        check_chat_template(config.model)
    backend = LazyBackend(lambda: build_backend(config, on_ready=lambda text: console.log(f"aloe infer: {text}")))
    params = GenerationParams(max_new_tokens=request.max_new_tokens, temperature=request.temperature,
                              top_p=request.top_p, seed=request.seed)
    stage = InferStage(backend, params, system=request.system, draw=request.draw)
    run_config = RunConfig(batch_size=config.items_at_once, on_error=request.on_error,
                           shard=resolve_shard(request.shard))
    try:
        if request.question is not None:
            record = _question_record(request.question, request.images)
            root = request.image_root or Path.cwd()
            item = Item(record, "<command line>", "<command line>", image_root=root)
            stage.annotate([item])
            answer = (item.record.get("aloe") or {}).get("infer")
            if answer is not None:  # the answer first, whatever happens to its drawing
                print_stdout(answer["text"])
                _log_boxes(answer["boxes"], stage)
            if item.error is not None:
                raise item.error
            return
        run_data_command(stage, request.inputs, image_root=request.image_root, output=request.output,
                         rejects=request.rejects, report=request.report, config=run_config,
                         defaults=RecordDefaults(keep_dicom_bytes=request.keep_dicom_bytes), images_first=True)
        _log_boxes(None, stage)
    finally:
        backend.close_if_open()
        sys.stdout.flush()


def _question_record(question: str, images: list[str]) -> dict:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": question}]
    return {"id": "answer", "messages": [{"role": "user", "content": content}], "images": list(images)}


def _log_boxes(boxes: list[dict] | None, stage) -> None:
    from aloe_cli.evaluation.inference import drawable

    for box in boxes or []:
        where = f" = pixels {box['pixels']}" if box.get("pixels") else ""
        flags = box.get("flags") or []
        note = ""
        if flags:
            drawn = " (drawn with its corners in order)" if stage.draw is not None and drawable(box) else (
                " (not drawn)" if stage.draw is not None else "")
            note = f"  flagged: {', '.join(flags)}{drawn}"
        console.log(f"  box {box['label'] or '(no label)'}: {box['box']} (0-1000){where}{note}")
    if stage.flagged and boxes is None:
        console.warn(f"infer: {stage.flagged} of {stage.boxes} box(es) flagged (reversed or outside 0-1000): see "
                     "aloe.infer.boxes[].flags; boxes outside 0-1000 are not drawn")
    if stage.drawn:
        console.log(f"aloe infer: drew {len(stage.drawn)} image(s) into {stage.drawn[0].parent}")
