"""The record schema (TRL's conversational vision format plus provenance).

A record is a plain dict so that fields we do not know about pass through
untouched. This module validates records and normalises them on read, once,
for every command (`normalize`, called by the reader in `io.py`): the other
shapes users bring (LLaVA/ShareGPT, LLaMA-Factory sharegpt/messages/alpaca,
TRL prompt/completion, OpenAI `image_url` parts, question/answer columns)
become the schema, region annotations become Qwen2-VL grounding text in the answer, and
`source` / `domain` are filled in where a record has none. Every stage
therefore sees the record the trainer will see. The VLMEvalKit TSV conversion
lives in `io.py` next to its reader because it needs the whole file (rows
refer to each other's images).

    {"id": ..., "source": ..., "domain": "medical" | "general",
     "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]}, ...],
     "images": [path | data URI | {"bytes": ..., "path": ...}],
     "aloe": {<stage>: {...}}}
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from aloe_cli.data.grounding import BBOX_FORMATS, ground_record
from aloe_cli.errors import RecordError

Record = dict[str, Any]

ROLES = ("system", "user", "assistant")
DOMAINS = ("medical", "general")
IMAGE_MARKER = "<image>"
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}
_IMAGE_COLUMNS = ("images", "image", "image_path")
_UNSUPPORTED_MEDIA = ("videos", "audios")


def modality(record: Record) -> str:
    """'multimodal' iff the record has at least one image."""
    return "multimodal" if record.get("images") else "text"


def annotate(record: Record, stage: str, values: dict[str, Any]) -> None:
    """Write a stage's annotations under `aloe.<stage>`, leaving everything else alone."""
    record.setdefault("aloe", {})[stage] = values


def image_placeholder_count(messages: list[dict]) -> int:
    count = 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return count


def validate(record: Any) -> Record:
    """Check the schema; raise RecordError naming the first bad field.

    The common case (a well-formed record) takes one tight pass; only a
    record that fails it is walked again to say precisely what is wrong.
    """
    try:
        placeholders = _count_placeholders_fast(record)
    except _Malformed:
        _explain_messages(record)  # always raises
        raise
    images = record.get("images")
    if images is None:
        images = []
    if type(images) is not list:
        raise RecordError("invalid_field", "must be a list", field="images")
    if placeholders != len(images):
        raise RecordError(
            "image_count_mismatch",
            f"{placeholders} image placeholder(s) in messages but {len(images)} in images",
            field="images",
        )
    for position, entry in enumerate(images):
        if type(entry) is not str or not entry or entry.isspace():  # the common case, a path or data URI, passes
            _check_image_entry(entry, position)
    domain = record.get("domain")
    if domain is not None and domain not in DOMAINS:
        raise RecordError("invalid_field", f"must be one of {', '.join(DOMAINS)}, got {domain!r}", field="domain")
    aloe = record.get("aloe")
    if aloe is not None and type(aloe) is not dict:  # stages write under it: aloe.<stage> = {...}
        raise RecordError("invalid_field", f"must be an object of stage annotations, got {_json_type(aloe)}",
                          field="aloe")
    return record


def _check_image_entry(entry: Any, position: int) -> None:
    from aloe_cli.data.images import check_entry_type

    try:
        check_entry_type(entry)
    except RecordError as error:
        raise RecordError(error.reason, error.message, field=f"images[{position}]") from None


def _json_type(value: Any) -> str:
    """How JSON names a value's type (what the user wrote)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", list: "an array"}.get(type(value), type(value).__name__)


class _Malformed(Exception):
    pass


_ROLE_SET = frozenset(ROLES)


def _count_placeholders_fast(record: Any) -> int:
    try:
        messages = record["messages"]
        if type(messages) is not list or not messages:
            raise _Malformed
        placeholders = 0
        for message in messages:
            if message["role"] not in _ROLE_SET:
                raise _Malformed
            content = message["content"]
            if type(content) is str:
                continue
            if type(content) is not list:
                raise _Malformed
            for part in content:
                kind = part["type"]
                if kind == "text":
                    if type(part["text"]) is not str:
                        raise _Malformed
                elif kind == "image":
                    placeholders += 1
                else:
                    raise _Malformed
        return placeholders
    except (KeyError, TypeError):
        raise _Malformed from None


def _explain_messages(record: Any) -> None:
    """Raise the precise RecordError for a record the fast pass refused."""
    if not isinstance(record, dict):
        raise RecordError("invalid_record", f"expected a JSON object, got {type(record).__name__}")
    messages = record.get("messages")
    if messages is None:
        raise RecordError("missing_field", "missing (every record needs 'messages')", field="messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("invalid_field", "must be a non-empty list of messages", field="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError("invalid_field", "must be an object", field=f"messages[{i}]")
        if message.get("role") not in ROLES:
            raise RecordError("invalid_field", f"role must be one of {', '.join(ROLES)}, got {message.get('role')!r}",
                              field=f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise RecordError("invalid_field", "must be a string or a list of parts", field=f"messages[{i}].content")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and not isinstance(part.get("text"), str):
                raise RecordError("invalid_field", "must be a string", field=f"messages[{i}].content[{j}].text")
            if kind not in ("text", "image"):
                raise RecordError("invalid_field", f"part type must be 'text' or 'image', got {kind!r}",
                                  field=f"messages[{i}].content[{j}].type")
    raise RecordError("invalid_field", "malformed", field="messages")


@dataclass(frozen=True)
class RecordDefaults:
    """What normalisation fills in: the reader's options.

    `source` and `domain` go to records that have none (a record's own value
    wins); `bbox_format` says how pixel boxes in `objects` / `bbox` are written;
    `keep_dicom_bytes` passes embedded DICOM data through with its header.
    """

    source: str | None = None
    domain: str | None = None
    bbox_format: str = "xyxy"
    # Embedded DICOM data is re-encoded as PNG on read (its header may hold patient data) unless this is set.
    keep_dicom_bytes: bool = False

    def __post_init__(self) -> None:
        if self.domain is not None and self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        if self.bbox_format not in BBOX_FORMATS:
            raise ValueError(f"bbox_format must be one of {BBOX_FORMATS}, got {self.bbox_format!r}")


def normalize(raw: Any, defaults: RecordDefaults = RecordDefaults(),
              image_root: str | os.PathLike | None = None) -> Record:
    """Bring a record of any supported shape into the schema the trainer reads (in place where possible).

    1. LLaVA/ShareGPT and question/answer shapes are rebuilt as `messages`;
       records already in the schema are kept as they are.
    2. The schema is validated.
    3. Embedded DICOM data (bytes, image structs, data URIs: sniffed by its
       magic) becomes its rendered pixels as PNG, without the header that may
       hold patient data, unless `defaults.keep_dicom_bytes`. DICOM referenced
       by path stays a path.
    4. Region annotations (`objects`, `bbox`) become grounding text in the
       answer; image sizes come from the image headers, relative paths
       resolve against `image_root`. Idempotent: a grounded record
       (`aloe.grounding`) is left alone, so a record read again by the next
       stage of a pipe keeps its text.
    5. `source` and `domain` are filled in from `defaults` where missing.

    Raises RecordError naming the field; the record may then be partly
    normalised (the reader scrubs embedded DICOM from what it rejects).
    """
    if not isinstance(raw, dict):
        raise RecordError("invalid_record", f"expected a JSON object, got {type(raw).__name__}")
    for column in _UNSUPPORTED_MEDIA:  # LLaMA-Factory's other media: training on the text alone would be wrong
        if column in raw and raw[column]:
            raise RecordError("unsupported_media", f"aloe reads images and text only; give the {column[:-1]} as "
                              "frames in 'images', or leave the record out", field=column)
    if "messages" in raw:
        record = raw if _in_schema(raw["messages"]) else from_chat_messages(raw)
    elif "conversations" in raw:
        record = from_sharegpt(raw)
    elif "prompt" in raw and "completion" in raw:
        record = from_prompt_completion(raw)
    elif "instruction" in raw:
        record = from_alpaca(raw)
    elif "question" in raw:
        record = from_question_answer(raw)
    else:
        raise RecordError("missing_field", "missing (need 'messages', 'conversations', 'prompt' and 'completion', "
                          "'instruction' or 'question')", field="messages")
    validate(record)
    if not defaults.keep_dicom_bytes and record.get("images"):
        _reencode_embedded_dicom(record["images"], image_root)
    if "objects" in record or "bbox" in record:  # the membership test keeps the common case cheap
        ground_record(record, image_root, defaults.bbox_format)
    if "aloe" in record and record["aloe"] is None:  # parquet writes null for a column a row lacks
        del record["aloe"]
    if defaults.source and not record.get("source"):
        record["source"] = defaults.source
    if defaults.domain and not record.get("domain"):
        record["domain"] = defaults.domain
    return record


def _reencode_embedded_dicom(images: list, image_root: str | os.PathLike | None) -> None:
    for position, entry in enumerate(images):
        if type(entry) is str and not entry.startswith("data:"):
            continue  # a path: the file is the user's, and it stays a path
        from aloe_cli.data.images import without_dicom_header

        try:
            images[position] = without_dicom_header(entry, image_root)
        except RecordError as error:
            raise RecordError(error.reason, error.message, field=f"images[{position}]") from None


def _image_list(raw: Record) -> list:
    for column in _IMAGE_COLUMNS:
        value = raw.get(column)
        if value is None or value == "" or value == []:
            continue
        return list(value) if isinstance(value, (list, tuple)) else [value]
    return []


def _passthrough(raw: Record, consumed: tuple[str, ...]) -> Record:
    return {key: value for key, value in raw.items() if key not in consumed}


def _split_image_markers(text: str) -> list[dict]:
    pieces = text.split(IMAGE_MARKER)
    if len(pieces) == 1:
        return [{"type": "text", "text": text}] if text else []
    parts: list[dict] = []
    for i, piece in enumerate(pieces):
        if i > 0:
            parts.append({"type": "image"})
        piece = piece.strip("\n")  # the newline that separates a marker from its text
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def _attach_unmarked_images(messages: list[dict], images: list) -> None:
    """LLaVA's and TRL's convention: images that no placeholder places belong at the start of the first
    user turn."""
    if not images or image_placeholder_count(messages) != 0:
        return
    first_user = next((m for m in messages if m["role"] == "user"), messages[0])
    content = first_user["content"]
    if isinstance(content, str):
        content = [{"type": "text", "text": content}] if content else []
    first_user["content"] = [{"type": "image"} for _ in images] + content


def _system_message(raw: Record) -> list[dict]:
    """LLaMA-Factory's `system` column: a system prompt for the whole conversation."""
    system = raw.get("system")
    if system is None or system == "":
        return []
    if not isinstance(system, str):
        raise RecordError("invalid_field", "must be a string", field="system")
    return [{"role": "system", "content": [{"type": "text", "text": system}]}]


def from_sharegpt(raw: Record) -> Record:
    """LLaVA / ShareGPT / LLaMA-Factory sharegpt: `conversations: [{from, value}]` with `<image>` markers
    (and LLaMA-Factory's optional `system` column)."""
    turns = raw.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("invalid_field", "must be a non-empty list", field="conversations")
    images = _image_list(raw)
    messages = _system_message(raw)
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError("invalid_field", "must be an object", field=f"conversations[{i}]")
        role = _SHAREGPT_ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        if role is None:
            raise RecordError("invalid_field", f"unknown speaker {turn.get('from')!r}",
                              field=f"conversations[{i}].from")
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise RecordError("invalid_field", "must be a string", field=f"conversations[{i}].value")
        messages.append({"role": role, "content": _split_image_markers(value) or [{"type": "text", "text": ""}]})
    _attach_unmarked_images(messages, images)
    record = _passthrough(raw, ("conversations", "system") + _IMAGE_COLUMNS)
    record["messages"] = messages
    record["images"] = images
    return record


# The ways a chat message's image part can carry its own image, rather than point into `images`: OpenAI's
# {"type": "image_url", "image_url": {"url": ...}} and transformers' {"type": "image", "url"|"path"|"image": ...}.
_IMAGE_SOURCE_KEYS = ("url", "path", "image")


def _carries_image(part: dict) -> bool:
    """An image part with a source of its own (a null, as parquet writes for absent struct fields, is none)."""
    return part.get("type") == "image_url" or (
        part.get("type") == "image" and any(part.get(key) is not None for key in _IMAGE_SOURCE_KEYS))


def _in_schema(messages: Any) -> bool:
    """True when every content is a list of plain text/image parts or a string without `<image>` markers: the
    common case, kept as it is. Anything else goes through `from_chat_messages` (which also explains errors)."""
    if type(messages) is not list:
        return True  # validate names the problem
    for message in messages:
        content = message.get("content") if type(message) is dict else None
        if type(content) is str:
            if IMAGE_MARKER in content:
                return False
        elif type(content) is list:
            for part in content:
                if type(part) is dict and _carries_image(part):
                    return False
    return True


def from_chat_messages(raw: Record) -> Record:
    """Chat messages in the forms other tools write, as the schema's parts.

    - LLaMA-Factory: string `content` with `<image>` placeholders, one per entry of `images`;
    - OpenAI: `{"type": "image_url", "image_url": {"url": path | data URI}}` parts (the URL becomes the
      image's entry in `images`, in order);
    - transformers: `{"type": "image", "url" | "path" | "image": ...}` parts, likewise.
    `images` entries fill the plain `{"type": "image"}` placeholders in order; images that nothing places go
    to the start of the first user turn.
    """
    messages = raw.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RecordError("invalid_field", "must be a non-empty list of messages", field="messages")
    given = _image_list(raw)
    images: list = []  # in placeholder order: own sources and `images` entries interleaved as they come
    used = 0  # plain placeholders met, each filled by the next `images` entry
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError("invalid_field", "must be an object", field=f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, str):
            content = _split_image_markers(content) if IMAGE_MARKER in content else [{"type": "text", "text": content}]
        elif not isinstance(content, list):
            raise RecordError("invalid_field", "must be a string or a list of parts",
                              field=f"messages[{i}].content")
        parts = []
        for j, part in enumerate(content):
            source = _part_image_source(part, f"messages[{i}].content[{j}]")
            if source is not None:
                images.append(source)
                parts.append({"type": "image"})
                continue
            if isinstance(part, dict) and part.get("type") == "image":
                if used < len(given):
                    images.append(given[used])
                used += 1
            parts.append(part)
        converted.append({**message, "content": parts})
    if used == 0 and given and not images:
        images = list(given)
        _attach_unmarked_images(converted, images)
    elif used != len(given):
        raise RecordError("image_count_mismatch", f"{used} image placeholder(s) in messages but {len(given)} "
                          "in images", field="images")
    record = _passthrough(raw, ("messages",) + _IMAGE_COLUMNS)
    record["messages"] = converted
    record["images"] = images
    return record


def _part_image_source(part: Any, field: str) -> Any:
    """The image a content part carries itself (OpenAI `image_url`, transformers `image` with a source), or None."""
    if not isinstance(part, dict):
        return None
    kind = part.get("type")
    if kind == "image_url":
        value = part.get("image_url")
        url = value.get("url") if isinstance(value, dict) else value
        if not isinstance(url, str) or not url.strip():
            raise RecordError("invalid_field", "must be an object with a 'url' (a path or a data URI)",
                              field=f"{field}.image_url")
        return _local_image(url, f"{field}.image_url.url")
    if kind == "image":
        for key in _IMAGE_SOURCE_KEYS:
            value = part.get(key)
            if value is not None:
                return _local_image(value, f"{field}.{key}") if isinstance(value, str) else value
    return None


def _local_image(url: str, field: str) -> str:
    """A path or data URI; `file://` URLs become paths; remote URLs are refused (aloe reads no network)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith(("http://", "https://")):
        raise RecordError("image_invalid", "remote image URLs are not fetched: download the image and give its path "
                          "or a data URI", field=field)
    return url


def _message_list(value: Any, field: str, role: str) -> list[dict]:
    """TRL's prompt or completion: a list of messages, or a string (one message of `role`)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and value:
        return value
    raise RecordError("invalid_field", "must be a string or a non-empty list of messages", field=field)


def from_prompt_completion(raw: Record) -> Record:
    """TRL's prompt/completion records: `prompt` and `completion` as message lists (conversational) or strings
    (standard), with an optional `images` column. The conversation is the prompt followed by the completion."""
    prompt = _message_list(raw.get("prompt"), "prompt", "user")
    completion = _message_list(raw.get("completion"), "completion", "assistant")
    for name, turns in (("prompt", prompt), ("completion", completion)):
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise RecordError("invalid_field", "must be an object", field=f"{name}[{i}]")
    combined = {**_passthrough(raw, ("prompt", "completion")), "messages": prompt + completion}
    try:
        return validate(from_chat_messages(combined))
    except RecordError as error:  # name the field the user wrote, not the combined list
        raise RecordError(error.reason, error.message, field=_prompt_field(error.field, len(prompt))) from None


def _prompt_field(field: str | None, prompt_turns: int) -> str | None:
    if field is None or not field.startswith("messages["):
        return field
    index, _, rest = field[len("messages["):].partition("]")
    position = int(index)
    if position < prompt_turns:
        return f"prompt[{position}]{rest}"
    return f"completion[{position - prompt_turns}]{rest}"


def from_alpaca(raw: Record) -> Record:
    """LLaMA-Factory's alpaca format: `instruction` (+ `input`, joined by a newline) is the user turn,
    `output` the answer, `system` the system prompt, `history` earlier `[instruction, answer]` pairs, and
    `images` with `<image>` placeholders (or none: the images go before the first user turn's text)."""
    instruction = raw.get("instruction")
    if not isinstance(instruction, str):
        raise RecordError("invalid_field", "must be a string", field="instruction")
    extra = raw.get("input")
    if extra is not None and not isinstance(extra, str):
        raise RecordError("invalid_field", "must be a string", field="input")
    history = raw.get("history") or []
    if not isinstance(history, list):
        raise RecordError("invalid_field", "must be a list of [instruction, answer] pairs", field="history")
    messages = []
    for i, pair in enumerate(history):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise RecordError("invalid_field", "must be a pair of strings [instruction, answer]",
                              field=f"history[{i}]")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    messages.append({"role": "user", "content": "\n".join(t for t in (instruction, extra) if t)})
    output = raw.get("output")
    if output is not None:
        if not isinstance(output, str):
            raise RecordError("invalid_field", "must be a string", field="output")
        messages.append({"role": "assistant", "content": output})
    combined = {**_passthrough(raw, ("instruction", "input", "output", "history", "system")),
                "messages": _system_message(raw) + messages}
    return from_chat_messages(combined)


def from_question_answer(raw: Record) -> Record:
    """Plain `question` / `answer` columns with optional image column(s)."""
    question = raw.get("question")
    if not isinstance(question, str):
        raise RecordError("invalid_field", "must be a string", field="question")
    images = _image_list(raw)
    content = _split_image_markers(question) if IMAGE_MARKER in question else (
        [{"type": "image"} for _ in images] + [{"type": "text", "text": question}])
    messages = [{"role": "user", "content": content}]
    answer = raw.get("answer")
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": str(answer)}]})
    record = _passthrough(raw, ("question", "answer") + _IMAGE_COLUMNS)
    record["messages"] = messages
    record["images"] = images
    return record


def text_of(message: dict) -> str:
    """All text of one message, parts joined (image placeholders dropped)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")
