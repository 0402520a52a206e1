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
import hashlib
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
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


def has_generation_markers(template: str) -> bool:
    return bool(_GENERATION_TAG.search(template))


def chatml_spans(text: str) -> list[Span]:
    """Loss spans of a ChatML text: each assistant answer and its `<|im_end|>`, not the header or the newline after."""
    return [match.span(1) for match in _CHATML_ANSWER.finditer(text)]


# ----------------------------------------------------------------------------- counting

@dataclass
class CountStats:
    records: int = 0
    tokenized_texts: int = 0  # texts actually sent to the tokenizer (after memo and de-duplication)
    memo_hits: int = 0


@dataclass
class LossTokenCounter:
    """Counts loss tokens of conversations with a fast tokenizer and a chat template.

    Build it with `load_counter`; `count(conversations)` returns one count
    per conversation, or raises RecordError when a conversation cannot be
    rendered (use `count_each` to get per-record errors).
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
    _renderer: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._boundary = _special_token_pattern(self.tokenizer)
        if self.span_rule not in SPAN_RULES:
            raise ValueError(f"span_rule must be one of {SPAN_RULES}, got {self.span_rule!r}")
        self._renderer = _direct_renderer(self.chat_template, self.template_kwargs)

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenizer + template + counting rule (the cache namespace)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            for part in (COUNTER_VERSION, self.span_rule, self.tokenizer.backend_tokenizer.to_str(),
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
        """Template texts and, for each, the character spans of its generation blocks.

        Messages get what apply_chat_template gives them: keys whose value is
        None are dropped, the tokenizer's special tokens are template variables.
        """
        chats = [[{key: value for key, value in message.items() if value is not None} for message in conversation]
                 for conversation in conversations]
        try:
            if self._renderer is not None:
                rendered = [self._renderer(chat) for chat in chats]
                texts, spans = [text for text, _ in rendered], [indices for _, indices in rendered]
            else:
                from transformers.utils.chat_template_utils import render_jinja_template

                tracked = self.span_rule == "generation"
                texts, spans = render_jinja_template(conversations=chats, chat_template=self.chat_template,
                                                     return_assistant_tokens_mask=tracked, add_generation_prompt=False,
                                                     **self.template_kwargs)
        except Exception as exc:  # jinja2 TemplateError, raise_exception() in the template, bad message shapes
            raise RecordError("template_error", f"the chat template cannot render this conversation: {exc}") from None
        if self.span_rule == "chatml":
            spans = [chatml_spans(text) for text in texts]
        return texts, [[(s, e) for s, e in record_spans if e > s] for record_spans in spans]

    def render_each(self, conversations: Sequence[Messages]) -> list[tuple[str, list[Span]] | RecordError]:
        """`render` per conversation: (text, spans), or the RecordError of one the template rejects."""
        if not conversations:
            return []
        try:
            return list(zip(*self.render(conversations)))
        except RecordError:
            pass  # find the culprits one by one
        results: list[tuple[str, list[Span]] | RecordError] = []
        for conversation in conversations:
            try:
                texts, spans = self.render([conversation])
                results.append((texts[0], spans[0]))
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
            encodings = self.tokenizer.backend_tokenizer.encode_batch(cuts, add_special_tokens=False)
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


def _direct_renderer(template: str, template_kwargs: dict):
    """Render one chat with transformers' own compiled template and generation tracker, or None.

    This is what `render_jinja_template` does per chat, without its deep copy
    of every message into plain types (a guard for arbitrary Python objects;
    records read from JSON, parquet or Arrow hold plain types already), which
    costs about a third of the rendering time. These helpers are internal to
    transformers, so when they are missing or change shape the public
    function is used instead.
    """
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template, _render_with_assistant_indices

        compiled = _compile_jinja_template(template)
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
        _render_with_assistant_indices(compiled, probe, None, None, False, **template_kwargs)
    except Exception:  # ImportError, a changed signature, ...: fall back to the public renderer
        return None

    def render(chat: Messages) -> tuple[str, list[Span]]:
        return _render_with_assistant_indices(compiled, chat, None, None, False, **template_kwargs)

    return render


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
    tokenized independently, so a cut there cannot change a token.
    """
    added = tokenizer.backend_tokenizer.get_added_tokens_decoder().values()
    safe = sorted({token.content for token in added
                   if token.content and not token.normalized and not token.lstrip and not token.rstrip
                   and not token.single_word}, key=len, reverse=True)
    if not safe:
        return None
    return re.compile("|".join(re.escape(content) for content in safe))


def reference_count(tokenizer, messages: Messages, chat_template: str | None = None) -> int:
    """The slow, obviously right count: one apply_chat_template call, summing the assistant mask."""
    out = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    return int(sum(out["assistant_masks"]))


# ----------------------------------------------------------------------------- loading

def load_counter(tokenizer_ref: str, chat_template: str | None = None, *, trust_remote_code: bool = False
                 ) -> LossTokenCounter:
    """Load a fast tokenizer (local folder or Hub id) and the chat template that defines the loss.

    `chat_template` overrides the tokenizer's own: a path to a Jinja file or
    the template text itself. A template without `{% generation %}` markers
    (the published Qwen2-VL checkpoints have none) is accepted when it is
    ChatML: the loss spans then follow the ChatML layout, the rule
    `aloe perplexity` uses too.
    """
    tokenizer = _load_tokenizer(tokenizer_ref, trust_remote_code)
    template = _resolve_template(tokenizer, tokenizer_ref, chat_template)
    rule = "generation" if has_generation_markers(template) else "chatml"
    if rule == "chatml" and not _is_chatml(tokenizer, template):
        raise AloeError(f"the chat template of {tokenizer_ref!r} has no {{% generation %}} markers and is not "
                        "ChatML, so it does not say which tokens the loss is computed on; give a template with "
                        "markers (chat_template: a .jinja file, see docs/mix.md)")
    kwargs = dict(tokenizer.special_tokens_map)  # what apply_chat_template passes to the template
    return LossTokenCounter(tokenizer=tokenizer, chat_template=template, name=tokenizer_ref, template_kwargs=kwargs,
                            span_rule=rule)


def _is_chatml(tokenizer, template: str) -> bool:
    vocab = tokenizer.get_vocab()
    return "<|im_start|>" in vocab and "<|im_end|>" in vocab and "<|im_start|>" in template


def _load_tokenizer(ref: str, trust_remote_code: bool):
    if ref.startswith(("/", "./", "../", "~")) and not Path(ref).expanduser().exists():
        raise AloeError(f"cannot load tokenizer {ref!r}: no such folder")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise AloeError("counting loss tokens needs transformers: pip install 'aloe-cli[models]'") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError for missing files/ids, ValueError for unknown classes, ...
        raise AloeError(f"cannot load tokenizer {ref!r}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                        ) from None
    if not getattr(tokenizer, "is_fast", False) or getattr(tokenizer, "backend_tokenizer", None) is None:
        raise AloeError(f"tokenizer {ref!r} is not a fast (Rust) tokenizer; loss-token counting needs one "
                        "(a folder with tokenizer.json)")
    return tokenizer


def _resolve_template(tokenizer, ref: str, override: str | None) -> str:
    if override is not None:
        return _template_from(override)
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if template is None:
        raise AloeError(f"tokenizer {ref!r} has no chat template; give one with chat_template: (a .jinja file)")
    return template


def _template_from(value: str) -> str:
    if "{%" in value or "{{" in value:
        return value
    path = Path(value).expanduser()
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AloeError(f"cannot read chat template {value}: {exc.strerror or exc}") from None


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
