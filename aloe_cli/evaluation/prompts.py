"""How an evaluation item is asked, under one of two protocols.

`vlmevalkit` (the default of `aloe eval`): the text VLMEvalKit sends a Qwen2-VL model for the item's
dataset (`aloe_cli.evaluation.vlmevalkit.prompt`), built from the fields as VLMEvalKit reads them.

`aloe`: aloe's own wording, the same for every benchmark:

    multiple choice   [Hint: ...\\n]Question: ...\\nOptions:\\nA. ...\\nB. ...\\n<MCQ_INSTRUCTION>
    yes / no          <question> Please answer yes or no.
    open-ended        <question>\\nPlease try to answer the question with short words or phrases if possible.

(a question written in Chinese gets the Chinese instruction for multiple choice). Images come first in
the user turn, in order, under both. The item becomes a record in the aloe schema (`eval_record`), so
perturbations and generation backends treat it like any other record.
"""

from __future__ import annotations

import re

from aloe_cli.evaluation import vlmevalkit
from aloe_cli.evaluation.benchmarks import EvalItem

PROTOCOLS = ("vlmevalkit", "aloe")

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
MCQ_INSTRUCTION_ZH = "请直接回答选项字母。"
YESNO_INSTRUCTION = " Please answer yes or no."
OPEN_INSTRUCTION = "\nPlease try to answer the question with short words or phrases if possible."
_CJK = re.compile(r"[\u4e00-\u9fff]")


def prompt_text(item: EvalItem, protocol: str = "aloe", dataset: str | None = None) -> str:
    """The question as sent under `protocol`; `dataset` is the VLMEvalKit dataset name (default: the benchmark)."""
    if protocol == "vlmevalkit":
        return vlmevalkit.prompt(item.vlmevalkit_fields(), dataset or item.benchmark, item.kind)
    if item.kind == "mcq":
        lines = [f"Hint: {item.hint}"] if item.hint else []
        lines.append(f"Question: {item.question}")
        lines.append("Options:")
        lines.extend(f"{letter}. {text}" for letter, text in (item.options or {}).items())
        text = "\n".join(lines)
        return text + "\n" + (MCQ_INSTRUCTION_ZH if _CJK.search(text) else MCQ_INSTRUCTION)
    if item.kind == "yesno":
        return item.question + YESNO_INSTRUCTION
    return item.question + OPEN_INSTRUCTION


def reference_text(item: EvalItem) -> str:
    """The reference answer as the record's assistant turn: the letter (as in VLMEvalKit TSVs), Yes/No, or text."""
    if item.kind == "mcq":
        return item.answer
    if item.kind == "yesno":
        return item.answer.capitalize()
    return item.answer


def eval_record(item: EvalItem, protocol: str = "aloe", dataset: str | None = None) -> dict:
    """The item as a record: one user turn (images, then the prompt) and the reference answer."""
    text = prompt_text(item, protocol, dataset)
    user = [{"type": "image"} for _ in item.images] + [{"type": "text", "text": text}]
    meta = {"kind": item.kind, "question": item.question, "answer": item.answer}
    if item.options:
        meta["options"] = dict(item.options)
    return {"id": item.id, "source": item.benchmark, "domain": "medical",
            "messages": [{"role": "user", "content": user},
                         {"role": "assistant", "content": [{"type": "text", "text": reference_text(item)}]}],
            "images": list(item.images), "meta": meta}


def prompt_messages(record: dict) -> list[dict]:
    """The conversation to continue: everything before the reference answer."""
    messages = record["messages"]
    end = len(messages) - 1 if messages and messages[-1]["role"] == "assistant" else len(messages)
    return messages[:end]


__all__ = ["MCQ_INSTRUCTION", "OPEN_INSTRUCTION", "PROTOCOLS", "YESNO_INSTRUCTION", "eval_record", "prompt_messages",
           "prompt_text", "reference_text"]
