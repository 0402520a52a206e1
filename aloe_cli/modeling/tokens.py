"""Counting loss-contributing assistant tokens, fast, and remembering the counts.

"Loss tokens" are the tokens the SFT loss is computed on: those the chat
template marks with `{% generation %}` ... `{% endgeneration %}` (the answer
of every assistant turn plus its end-of-turn token). They are exactly the 1s
of `tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
return_assistant_tokens_mask=True)["assistant_masks"]`, which is what TRL's
`assistant_only_loss` trains on. A ChatML template without markers (the
published Qwen2-VL checkpoints) is read by the ChatML layout instead: from
after `<|im_start|>assistant\n` up to and including `<|im_end|>`, the rule
`aloe perplexity` uses too. Image placeholders render outside every answer,
so images count zero and are never loaded.

Neither torch nor transformers is needed (importing transformers 5 imports
torch, ~700 MB of resident memory): the checkpoint's `tokenizer.json` is
loaded with the `tokenizers` library and set up the way transformers' fast
tokenizer sets it up (`tokenizer_config.json`'s added and special tokens,
`split_special_tokens`, no truncation or padding), and the chat template is
rendered with jinja2 in the environment `apply_chat_template` uses, with our
own `{% generation %}` extension recording the character spans of the
answers. The tests hold the counts equal to transformers'.

`LossTokenCounter` gets the same numbers much faster than one
`apply_chat_template` call per record:
- the template is rendered per batch, with the character spans of the
  answers;
- only the part of each text that can hold loss tokens is tokenized. The
  tokenizer splits its text at added special tokens first and tokenizes the
  pieces in between independently, so cutting the text at special-token
  boundaries around the spans changes no token the mask can see (the system
  prompt and the first question are never tokenized);
- all cut texts of a batch go to the Rust tokenizer in one call, and identical
  ones (short answers such as "Yes.<|im_end|>" repeat a lot) only once;
- `count_pipelined` tokenizes one batch on a worker thread (the Rust tokenizer
  releases the GIL) while the caller reads and renders the next;
- the tokens overlapping a span are found by bisecting the token offsets.

`TokenCache` stores counts in a small SQLite file keyed by a hash of the
tokenizer, the chat template and the record's messages, so that re-running a
mix with another recipe does not tokenize again.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from operator import itemgetter
from pathlib import Path
from typing import Any

import orjson

from aloe_cli.errors import AloeError, RecordError

Messages = list[dict]
Span = tuple[int, int]

COUNTER_VERSION = "1"  # part of the cache key: bump when the counting rule changes
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_MEMO_MAX_ENTRIES = 50_000
_MEMO_MAX_TEXT = 160  # only short cut texts are memoised: long answers rarely repeat
SPAN_RULES = ("generation", "chatml")
# ChatML (Qwen2-VL's layout): an assistant turn's loss tokens run from after its header line to its <|im_end|>.
_CHATML_ANSWER = re.compile(r"<\|im_start\|>assistant\n(.*?(?:<\|im_end\|>|\Z))", re.DOTALL)
# Older names of a message's reasoning; apply_chat_template copies them to `reasoning_content` and `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


def chatml_spans(text: str) -> list[Span]:
    """Loss spans of a ChatML text: each assistant answer and its `<|im_end|>`, not the header or the newline after."""
    return [match.span(1) for match in _CHATML_ANSWER.finditer(text)]


# ----------------------------------------------------------------------------- chat templates

class _Emitted:
    """What one render has written so far: its length, and the spans of its generation blocks."""

    __slots__ = ("length", "spans")

    def __init__(self) -> None:
        self.length = 0
        self.spans: list[Span] = []


# The render in progress in this thread (renders of one template may run in several threads).
_ACTIVE_RENDER: ContextVar[_Emitted | None] = ContextVar("aloe_active_render", default=None)


@functools.lru_cache(maxsize=1)
def _jinja_environment():
    """A jinja2 environment like the one transformers renders chat templates in.

    Chat templates come from the Hub and are untrusted code: the sandbox is
    immutable (a template cannot mutate the messages, so they need no copy),
    jinja2 must be recent enough to have no known sandbox escape, and `dict`
    and `namespace` are narrowed as transformers narrows them. Whitespace
    control (trim_blocks, lstrip_blocks), the `raise_exception` and
    `strftime_now` globals and the non-escaping `tojson` filter are what
    templates are written against.
    """
    try:
        import jinja2
        from jinja2 import nodes
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise AloeError("rendering chat templates needs jinja2: pip install 'aloe-cli[mix]'") from None
    if tuple(int(part) for part in re.findall(r"\d+", jinja2.__version__)[:3]) < (3, 1, 6):
        raise AloeError(f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need jinja2>=3.1.6")

    class GenerationSpans(Extension):
        """`{% generation %}...{% endgeneration %}`: renders its body and records where it lands.

        The span starts at the length of the output emitted so far, exactly as
        transformers' AssistantTracker measures it (also for a block inside a
        `{% set %}` capture, where that is not where the text ends up).
        """

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        def _generation(self, caller) -> str:
            text = caller()
            emitted = _ACTIVE_RENDER.get()
            if emitted is not None:
                emitted.spans.append((emitted.length, emitted.length + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja2's own tojson escapes HTML characters, which templates do not expect
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    class TemplateDict:
        # `dict` for templates without a handle on the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # a namespace must not store underscore-prefixed attributes (a way into CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationSpans, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env


@functools.lru_cache(maxsize=16)
def _compile_template(source: str):
    return _jinja_environment().from_string(source)


class ChatTemplate:
    """A chat template rendered as `apply_chat_template` renders it, returning the generation spans too."""

    def __init__(self, source: str):
        self.source = source
        try:
            self._template = _compile_template(source)
        except AloeError:
            raise
        except Exception as exc:  # jinja2.TemplateSyntaxError
            raise AloeError(f"the chat template does not compile: {_first_line(exc)}") from None

    def render(self, messages: Messages, variables: dict | None = None,
               add_generation_prompt: bool = False) -> tuple[str, list[Span]]:
        """The text, and the character spans of its `{% generation %}` blocks.

        Like apply_chat_template: keys whose value is None are dropped from
        the messages, older reasoning field names are aliased, `tools` and
        `documents` are None, `variables` (the special tokens) are visible.
        """
        chat = [_template_message(message) for message in messages]
        emitted = _Emitted()
        token = _ACTIVE_RENDER.set(emitted)
        try:
            pieces = []
            for piece in self._template.generate(messages=chat, tools=None, documents=None,
                                                 add_generation_prompt=add_generation_prompt, **(variables or {})):
                pieces.append(piece)
                emitted.length += len(piece)
        finally:
            _ACTIVE_RENDER.reset(token)
        return "".join(pieces), emitted.spans


def _template_message(message: dict) -> dict:
    if not isinstance(message, dict):
        raise TypeError(f"chat messages must be objects, got {type(message).__name__}")
    plain = {key: value for key, value in message.items() if value is not None}
    reasoning = next((plain[key] for key in _REASONING_FIELDS if key in plain), None)
    if reasoning is not None:
        plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
    return plain


# ----------------------------------------------------------------------------- counting

@dataclass
class CountStats:
    records: int = 0
    tokenized_texts: int = 0  # texts actually sent to the tokenizer (after memo and de-duplication)
    memo_hits: int = 0


@dataclass
class LossTokenCounter:
    """Counts loss tokens of conversations with a fast tokenizer and a chat template.

    Build it with `load_counter`; `tokenizer` is a `tokenizers.Tokenizer`.
    `count(conversations)` returns one count per conversation, or raises
    RecordError when a conversation cannot be rendered (use `count_each` to
    get per-record errors).
    """

    tokenizer: Any
    chat_template: str
    name: str
    template_kwargs: dict = field(default_factory=dict)
    span_rule: str = "generation"  # or "chatml", for templates without {% generation %} markers
    stats: CountStats = field(default_factory=CountStats)
    _boundary: re.Pattern | None = field(default=None, init=False, repr=False)
    _memo: dict[tuple[str, tuple[Span, ...]], int] = field(default_factory=dict, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)
    _template: ChatTemplate | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.span_rule not in SPAN_RULES:
            raise ValueError(f"span_rule must be one of {SPAN_RULES}, got {self.span_rule!r}")
        self._boundary = _special_token_pattern(self.tokenizer)
        self._template = ChatTemplate(self.chat_template)

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenizer + template + counting rule (the cache namespace)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            for part in (COUNTER_VERSION, self.span_rule, self.tokenizer.to_str(),
                         self.chat_template, json.dumps(self.template_kwargs, sort_keys=True)):
                digest.update(part.encode("utf-8"))
                digest.update(b"\0")
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def count(self, conversations: Sequence[Messages]) -> list[int]:
        """Loss tokens per conversation; RecordError if the template rejects one of them."""
        texts, spans = self.render(conversations)
        return self.count_rendered(texts, spans)

    def count_each(self, conversations: Sequence[Messages]) -> list[int | RecordError]:
        """Like `count`, but a conversation the template rejects yields its RecordError."""
        return self._count_rendered_each(self.render_each(conversations))

    def count_pipelined(self, jobs: Iterable[tuple[Any, Sequence[Messages]]]
                        ) -> Iterator[tuple[Any, list[int | RecordError]]]:
        """`count_each` over a stream of (context, conversations) jobs, results in order.

        A job is rendered in the calling thread; its tokenization then runs on
        a worker thread (the Rust tokenizer releases the GIL) while the caller
        produces and renders the next job, so reading, rendering and
        tokenizing overlap. At most one job is in flight.
        """
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="aloe-tokens") as pool:
            in_flight: tuple[Any, Future] | None = None
            for context, conversations in jobs:
                rendered = self.render_each(conversations)
                future = pool.submit(self._count_rendered_each, rendered)
                if in_flight is not None:
                    yield in_flight[0], in_flight[1].result()
                in_flight = (context, future)
            if in_flight is not None:
                yield in_flight[0], in_flight[1].result()

    def render(self, conversations: Sequence[Messages]) -> tuple[list[str], list[list[Span]]]:
        """Template texts and, for each, the character spans of its loss tokens (empty spans dropped)."""
        rendered = [self.render_one(conversation) for conversation in conversations]
        return [text for text, _ in rendered], [spans for _, spans in rendered]

    def render_one(self, conversation: Messages) -> tuple[str, list[Span]]:
        """One conversation's text and loss spans; RecordError if the template rejects it."""
        try:
            text, spans = self._template.render(conversation, self.template_kwargs)
        except Exception as exc:  # jinja2 TemplateError, raise_exception() in the template, bad message shapes
            raise RecordError("template_error", "the chat template cannot render this conversation: "
                                                f"{_first_line(exc)}") from None
        if self.span_rule == "chatml":
            spans = chatml_spans(text)
        return text, [(s, e) for s, e in spans if e > s]

    def render_each(self, conversations: Sequence[Messages]) -> list[tuple[str, list[Span]] | RecordError]:
        """`render` per conversation: (text, spans), or the RecordError of one the template rejects."""
        results: list[tuple[str, list[Span]] | RecordError] = []
        for conversation in conversations:
            try:
                results.append(self.render_one(conversation))
            except RecordError as error:
                results.append(error)
        return results

    def _count_rendered_each(self, rendered: list[tuple[str, list[Span]] | RecordError]) -> list[int | RecordError]:
        good = [i for i, entry in enumerate(rendered) if not isinstance(entry, RecordError)]
        counts = self.count_rendered([rendered[i][0] for i in good], [rendered[i][1] for i in good])
        results: list[int | RecordError] = list(rendered)  # type: ignore[arg-type]
        for i, count in zip(good, counts):
            results[i] = count
        return results

    def count_rendered(self, texts: Sequence[str], spans: Sequence[Sequence[Span]]) -> list[int]:
        counts = [0] * len(texts)
        pending: dict[str, list[tuple[int, tuple[Span, ...]]]] = {}  # cut text -> [(record, spans in the cut)]
        for i, (text, record_spans) in enumerate(zip(texts, spans)):
            if not record_spans:
                continue
            cut, cut_spans = self._cut(text, record_spans)
            memo = self._memo.get((cut, cut_spans))
            if memo is not None:
                counts[i] = memo
                self.stats.memo_hits += 1
            else:
                pending.setdefault(cut, []).append((i, cut_spans))
        if pending:
            cuts = list(pending)
            encodings = self.tokenizer.encode_batch(cuts, add_special_tokens=False)
            self.stats.tokenized_texts += len(cuts)
            for cut, encoding in zip(cuts, encodings):
                offsets = _TokenOffsets(encoding)
                for i, cut_spans in pending[cut]:
                    counts[i] = tokens_overlapping(offsets, cut_spans)
                    if len(cut) <= _MEMO_MAX_TEXT and len(self._memo) < _MEMO_MAX_ENTRIES:
                        self._memo[(cut, cut_spans)] = counts[i]
        self.stats.records += len(texts)
        return counts

    def _cut(self, text: str, spans: Sequence[Span]) -> tuple[str, tuple[Span, ...]]:
        """The smallest piece of `text`, cut at special-token boundaries, that holds every span."""
        first, last = spans[0][0], spans[-1][1]
        start, end = 0, len(text)
        if self._boundary is not None:
            for match in self._boundary.finditer(text):
                if match.start() <= first:
                    start = match.start()
                if match.end() >= last:
                    end = match.end()
                    break
        return text[start:end], tuple((s - start, e - start) for s, e in spans)


class _TokenOffsets:
    """An encoding's token offsets as a sequence, fetched one at a time (bisect reads only a few)."""

    __slots__ = ("_encoding", "_length")

    def __init__(self, encoding) -> None:
        self._encoding = encoding
        self._length = len(encoding)

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[int, int]:
        return self._encoding.token_to_chars(index)


def tokens_overlapping(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> int:
    """How many tokens overlap at least one span (the rule of transformers' assistant mask).

    Token offsets are non-decreasing in a single sequence, so the tokens of a
    span [s, e) run from the first token that ends after s to the last that
    starts before e; consecutive ranges are merged so no token counts twice.
    """
    total, covered_until = 0, 0
    for start, end in spans:
        first = max(bisect.bisect_right(offsets, start, key=itemgetter(1)), covered_until)
        stop = bisect.bisect_left(offsets, end, key=itemgetter(0))
        if stop > first:
            total += stop - first
            covered_until = stop
    return total


def _special_token_pattern(tokenizer) -> re.Pattern | None:
    """Added tokens the tokenizer always splits on, whatever surrounds them.

    Only tokens matched on the raw text with no whitespace stripping and no
    word-boundary rule qualify: for them, the text on either side is
    tokenized independently, so a cut there cannot change a token. With
    `split_special_tokens` the special ones are read as plain text, so they
    do not qualify either.
    """
    plain_specials = bool(getattr(tokenizer, "encode_special_tokens", False))
    added = tokenizer.get_added_tokens_decoder().values()
    safe = sorted({token.content for token in added
                   if token.content and not token.normalized and not token.lstrip and not token.rstrip
                   and not token.single_word and not (plain_specials and token.special)}, key=len, reverse=True)
    if not safe:
        return None
    return re.compile("|".join(re.escape(content) for content in safe))


def reference_count(tokenizer, messages: Messages, chat_template: str | None = None) -> int:
    """The slow, obviously right count: one transformers apply_chat_template call, summing the assistant mask.

    `tokenizer` is a transformers tokenizer (for tests and benchmarks; aloe itself never loads one here).
    """
    out = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return int(sum(out["assistant_masks"]))


# ----------------------------------------------------------------------------- loading

# The named special tokens of transformers 5 tokenizers; chat templates see them as variables.
_NAMED_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_TOKENIZER_FILE = "tokenizer.json"
_CONFIG_FILE = "tokenizer_config.json"
_LEGACY_SPECIAL_TOKENS_FILE = "special_tokens_map.json"
_TEMPLATE_FILE = "chat_template.jinja"  # wins over tokenizer_config.json's chat_template, as in transformers
_PROCESSOR_TEMPLATE_FILE = "chat_template.json"  # a processor's {"chat_template": ...}, the last resort


@dataclass
class Checkpoint:
    """What loss-token counting needs from a model folder or Hub repository."""

    tokenizer: Any  # tokenizers.Tokenizer, set up like transformers' fast tokenizer
    special_tokens: dict[str, str]  # template variables: bos_token, eos_token, ... (transformers' special_tokens_map)
    chat_template: str | None


def load_counter(tokenizer_ref: str, chat_template: str | None = None, *, trust_remote_code: bool = False
                 ) -> LossTokenCounter:
    """Load a fast tokenizer (local folder or Hub id) and the chat template that defines the loss.

    `chat_template` overrides the checkpoint's own: a path to a Jinja file or
    the template text itself. A template without `{% generation %}` markers
    (the published Qwen2-VL checkpoints have none) is accepted when it is
    ChatML: the loss spans then follow the ChatML layout, the rule
    `aloe perplexity` uses too. `trust_remote_code` is accepted for
    compatibility and has no effect: only tokenizer.json is read, never code.
    """
    checkpoint = load_checkpoint(tokenizer_ref)
    template = _template_from(chat_template) if chat_template is not None else checkpoint.chat_template
    if template is None:
        raise AloeError(f"tokenizer {tokenizer_ref!r} has no chat template (no {_TEMPLATE_FILE}, no chat_template in "
                        f"{_CONFIG_FILE}, no {_PROCESSOR_TEMPLATE_FILE}); give one with chat_template: (a .jinja file)")
    rule = "generation" if has_generation_markers(template) else "chatml"
    if rule == "chatml" and not _is_chatml(checkpoint.tokenizer, template):
        raise AloeError(f"the chat template of {tokenizer_ref!r} has no {{% generation %}} markers and is not "
                        "ChatML, so it does not say which tokens the loss is computed on; give a template with "
                        "markers (chat_template: a .jinja file, see docs/mix.md)")
    return LossTokenCounter(tokenizer=checkpoint.tokenizer, chat_template=template, name=tokenizer_ref,
                            template_kwargs=dict(checkpoint.special_tokens), span_rule=rule)


def load_checkpoint(ref: str) -> Checkpoint:
    """tokenizer.json, special tokens and chat template of a local folder or a Hub repository (HF cache first)."""
    fetch = _file_fetcher(ref)
    tokenizer_path = fetch(_TOKENIZER_FILE, required=True)
    template_path = fetch(_TEMPLATE_FILE)
    config_path = fetch(_CONFIG_FILE)
    config = _read_json(ref, config_path) if config_path is not None else {}
    if "added_tokens_decoder" not in config:  # transformers reads the legacy special-token file only then
        legacy_path = fetch(_LEGACY_SPECIAL_TOKENS_FILE)
        if legacy_path is not None:
            config = {**config, **_read_json(ref, legacy_path)}  # its entries win, as in transformers
    template = _read_text(ref, template_path) if template_path is not None else _config_template(config)
    if template is None:
        processor_path = fetch(_PROCESSOR_TEMPLATE_FILE)
        if processor_path is not None:
            template = _config_template(_read_json(ref, processor_path))
    tokenizer = _load_tokenizer_json(ref, tokenizer_path, config)
    return Checkpoint(tokenizer, _special_tokens_map(config), template)


def _file_fetcher(ref: str) -> Callable[..., Path | None]:
    """fetch(name, required=False) -> the path of one file of the checkpoint, or None when it has none."""
    folder = Path(ref).expanduser()
    if folder.is_dir():
        return _folder_fetcher(ref, folder)
    if folder.exists():
        raise AloeError(f"cannot load tokenizer {ref!r}: not a folder (give the model folder that holds "
                        f"{_TOKENIZER_FILE})")
    if ref.startswith(("/", "./", "../", "~")) or ref.count("/") > 1 or not ref.strip():
        raise AloeError(f"cannot load tokenizer {ref!r}: no such folder")
    return _hub_fetcher(ref)


def _folder_fetcher(ref: str, folder: Path) -> Callable[..., Path | None]:
    def fetch_local(name: str, required: bool = False) -> Path | None:
        path = folder / name
        if path.is_file():
            return path
        if required:
            raise AloeError(f"cannot load tokenizer {ref!r}: the folder has no {name} (loss-token counting "
                            "needs a fast tokenizer's tokenizer.json)")
        return None

    return fetch_local


def _hub_fetcher(repo_id: str) -> Callable[..., Path | None]:
    """Files of a Hub repository: from the Hugging Face cache when tokenizer.json is there, else downloaded.

    A cached snapshot holds every tokenizer file the repository has (a full
    download, transformers' or ours), so once tokenizer.json is cached the
    snapshot is read like a local folder and the Hub is never asked: this
    works offline and costs no round trip.
    """
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise AloeError(f"cannot load tokenizer {repo_id!r}: no such folder, and reading a Hub id needs "
                        "huggingface_hub (pip install huggingface_hub)") from None
    try:
        cached = try_to_load_from_cache(repo_id, _TOKENIZER_FILE)
    except Exception as exc:  # an invalid repo id
        raise AloeError(f"cannot load tokenizer {repo_id!r}: {_first_line(exc)}") from None
    if isinstance(cached, str):
        return _folder_fetcher(repo_id, Path(cached).parent)

    def fetch_hub(name: str, required: bool = False) -> Path | None:
        try:
            with _quiet_hub_logs():
                return Path(hf_hub_download(repo_id, name))
        except LocalEntryNotFoundError:
            if not required:
                return None
            raise AloeError(f"cannot load tokenizer {repo_id!r}: no such folder, and its {name} is neither in the "
                            "Hugging Face cache nor downloadable (offline?)") from None
        except EntryNotFoundError:
            if not required:
                return None
            raise AloeError(f"cannot load tokenizer {repo_id!r}: the Hub repository has no {name} (loss-token "
                            "counting needs a fast tokenizer's tokenizer.json)") from None
        except Exception as exc:  # unknown or gated repository, network errors
            raise AloeError(f"cannot load tokenizer {repo_id!r}: {_first_line(exc)}") from None

    return fetch_hub


@contextmanager
def _quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub logs its retries on stderr; our error, if any, says it in one line."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _read_text(ref: str, path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AloeError(f"cannot load tokenizer {ref!r}: cannot read {path}: {_first_line(exc)}") from None


def _read_json(ref: str, path: Path) -> dict:
    try:
        value = json.loads(_read_text(ref, path))
    except json.JSONDecodeError as exc:
        raise AloeError(f"cannot load tokenizer {ref!r}: {path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise AloeError(f"cannot load tokenizer {ref!r}: {path} does not hold a JSON object")
    return value


def _config_template(config: dict) -> str | None:
    """`chat_template` of tokenizer_config.json or chat_template.json: a string, or named templates (the default)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((entry.get("template") for entry in template
                         if isinstance(entry, dict) and entry.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _token_content(value: Any) -> str | None:
    """A special token in tokenizer_config.json: a string or a serialised AddedToken."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens_map(config: dict) -> dict[str, str]:
    """transformers 5's `special_tokens_map`: the named tokens, which apply_chat_template passes to the template.

    The standard names (bos_token, ...), then model-specific ones: other
    `*_token` string entries and a dict-valued `extra_special_tokens`.
    """
    named = {key: content for key in _NAMED_TOKENS if (content := _token_content(config.get(key))) is not None}
    for key, value in config.items():
        if key.endswith("_token") and key not in _NAMED_TOKENS and isinstance(value, str):
            named[key] = value
    extra = _extra_special_tokens(config)
    if isinstance(extra, dict):
        named.update({key: content for key, value in extra.items() if (content := _token_content(value)) is not None})
    return named


def _extra_special_tokens(config: dict) -> list | dict | None:
    extra = config.get("extra_special_tokens")
    if not extra and config.get("additional_special_tokens"):  # the transformers 4 name
        extra = config["additional_special_tokens"]
    return extra if isinstance(extra, (list, dict)) else None


def _load_tokenizer_json(ref: str, path: Path, config: dict):
    """tokenizer.json, set up as transformers' fast tokenizer sets it up for `apply_chat_template(tokenize=True)`.

    - the added tokens of tokenizer_config.json are (re-)added with their
      flags, then every named or extra special token that is not an added
      token yet is added as a special one: the tokenizer splits the text on
      all of them;
    - `split_special_tokens` (read special tokens as plain text) is honoured;
    - no truncation and no padding (apply_chat_template's defaults).
    """
    try:
        from tokenizers import AddedToken, Tokenizer
    except ImportError:
        raise AloeError("counting loss tokens needs the tokenizers library: pip install 'aloe-cli[mix]'") from None
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # not a tokenizers serialisation, or one from a newer tokenizers
        raise AloeError(f"cannot load tokenizer {ref!r}: {path.name} does not load ({_first_line(exc)})") from None

    def added_token(value: Any, special: bool | None = None) -> Any:
        if isinstance(value, str):
            return AddedToken(value, special=True)
        flags = {key: value[key] for key in ("single_word", "lstrip", "rstrip", "normalized", "special")
                 if key in value}
        if special is not None:
            flags["special"] = special or flags.get("special", False)
        return AddedToken(value["content"], **flags)

    to_add = []
    declared = config.get("added_tokens_decoder")
    if isinstance(declared, dict):
        for _, entry in sorted(declared.items(), key=lambda item: int(item[0])):
            if isinstance(entry, dict) and isinstance(entry.get("content"), str):
                to_add.append(added_token(entry))
    present = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    present.update(token.content for token in to_add)
    named = [config.get(key) for key in _NAMED_TOKENS] + [
        value for key, value in config.items() if key.endswith("_token") and key not in _NAMED_TOKENS
        and isinstance(value, str)]
    extra = _extra_special_tokens(config)
    extra_values = list(extra.values()) if isinstance(extra, dict) else list(extra or [])
    for value, is_named in [(v, True) for v in named] + [(v, False) for v in extra_values]:
        content = _token_content(value)
        if content is None or content in present:
            continue
        to_add.append(added_token(value, special=True if is_named else None))
        present.add(content)
    if to_add:
        tokenizer.add_tokens(to_add)
    tokenizer.encode_special_tokens = bool(config.get("split_special_tokens", False))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _is_chatml(tokenizer, template: str) -> bool:
    return (tokenizer.token_to_id("<|im_start|>") is not None and tokenizer.token_to_id("<|im_end|>") is not None
            and "<|im_start|>" in template)


def _template_from(value: str) -> str:
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AloeError(f"cannot read chat template {value}: {exc.strerror or exc}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------- cache

def default_cache_path() -> Path:
    """$ALOE_CACHE_DIR, else $XDG_CACHE_HOME/aloe, else ~/.cache/aloe; the file is loss_tokens.sqlite."""
    root = os.environ.get("ALOE_CACHE_DIR")
    if not root:
        root = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "aloe")
    return Path(root) / "loss_tokens.sqlite"


def conversation_key(namespace: str, messages: Messages) -> bytes:
    """16-byte key of one conversation under a counter's fingerprint."""
    canonical = orjson.dumps(messages, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16, key=namespace.encode("ascii")[:64]).digest()


class TokenCache:
    """Loss-token counts in SQLite: one table (key BLOB PRIMARY KEY, tokens INTEGER).

    Keys come from `conversation_key`, so entries of different tokenizers or
    templates never collide and one file serves every recipe. Safe to share
    between processes (WAL journal, busy timeout).
    """

    _QUERY_CHUNK = 500

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.hits = 0
        self.misses = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), timeout=60)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS loss_tokens (key BLOB PRIMARY KEY, tokens INTEGER NOT NULL)"
                             " WITHOUT ROWID")
        except (OSError, sqlite3.Error) as exc:
            raise AloeError(f"cannot open the token cache {self.path}: {exc}") from None

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, int]:
        found: dict[bytes, int] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), self._QUERY_CHUNK):
            chunk = unique[i:i + self._QUERY_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._db.execute(f"SELECT key, tokens FROM loss_tokens WHERE key IN ({marks})", chunk))
        self.hits += sum(1 for key in keys if key in found)
        self.misses += sum(1 for key in keys if key not in found)
        return found

    def put_many(self, entries: Iterable[tuple[bytes, int]]) -> None:
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO loss_tokens (key, tokens) VALUES (?, ?)", entries)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TokenCache:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
