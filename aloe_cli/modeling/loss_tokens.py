"""Counting loss tokens, fast: the tokens inside the generation blocks of the chat template training uses.

What counts is defined in `chat_template` (`training_chat_template`): the
model's own template when it has `{% generation %}` markers, else the
training template aloe ships for its family. For Qwen2-VL that is each
assistant turn's content and its closing `<|im_end|>\n`, the tokens TRL's
`SFTTrainer(assistant_only_loss=True)` learns from, and `aloe perplexity`
scores. A count is the number of 1s of
`apply_chat_template(messages, chat_template=<training template>, tokenize=True, return_dict=True,
return_assistant_tokens_mask=True)["assistant_masks"]`. Image placeholders
render outside every answer, so images count zero and are never loaded.

Neither torch nor transformers is imported: the tokenizer comes from
`checkpoint` (tokenizer.json through `tokenizers`), the template is rendered
by `chat_template.ChatTemplate` with the character spans of its generation
blocks. The tests hold the counts equal to transformers' and to the labels
TRL trains on.

`LossTokenCounter` gets those numbers much faster than one
`apply_chat_template` call per record:
- the template is rendered per batch, with the character spans of the
  answers;
- only the part of each text that can hold loss tokens is tokenized. The
  tokenizer splits its text at added special tokens first and tokenizes the
  pieces in between independently, so cutting the text at special-token
  boundaries around the spans changes no token the mask can see (the system
  prompt and the first question are never tokenized);
- all cut texts of a batch go to the Rust tokenizer in one call, and identical
  ones (short answers such as "Yes.<|im_end|>\n" repeat a lot) only once;
- `count_pipelined` tokenizes one batch on a worker thread (the Rust tokenizer
  releases the GIL) while the caller reads and renders the next;
- the tokens overlapping a span are found by bisecting the token offsets.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from aloe_cli.errors import AloeError, RecordError, first_line
from aloe_cli.modeling.chat_template import (
    ChatTemplate,
    Messages,
    Span,
    has_generation_markers,
    read_template,
    training_chat_template,
)
from aloe_cli.modeling.checkpoint import load_checkpoint

# Part of the cache key: bump when the counting rule changes.
# 2: the span is the training template's generation block (Qwen2-VL: the answer + "<|im_end|>\n", was "<|im_end|>").
COUNTER_VERSION = "2"
_MEMO_MAX_ENTRIES = 50_000
_MEMO_MAX_TEXT = 160  # only short cut texts are memoised: long answers rarely repeat


@dataclass
class CountStats:
    records: int = 0
    tokenized_texts: int = 0  # texts actually sent to the tokenizer (after memo and de-duplication)
    memo_hits: int = 0


@dataclass
class LossTokenCounter:
    """Counts loss tokens of conversations with a fast tokenizer and the training chat template.

    Build it with `load_counter`; `tokenizer` is a `tokenizers.Tokenizer`,
    `chat_template` a template with generation markers (the training one).
    `count(conversations)` returns one count per conversation, or raises
    RecordError when a conversation cannot be rendered (use `count_each` to
    get per-record errors).
    """

    tokenizer: Any
    chat_template: str
    name: str
    template_kwargs: dict = field(default_factory=dict)
    stats: CountStats = field(default_factory=CountStats)
    _boundary: re.Pattern | None = field(default=None, init=False, repr=False)
    _memo: dict[tuple[str, tuple[Span, ...]], int] = field(default_factory=dict, init=False, repr=False)
    _fingerprint: str | None = field(default=None, init=False, repr=False)
    _template: ChatTemplate | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not has_generation_markers(self.chat_template):
            raise AloeError("loss tokens are the tokens inside {% generation %} blocks, and this chat template has "
                            "none: count with the training template (chat_template.training_chat_template)")
        self._boundary = _special_token_pattern(self.tokenizer)
        self._template = ChatTemplate(self.chat_template)

    @property
    def fingerprint(self) -> str:
        """Identifies the tokenizer + template + counting rule (the cache namespace)."""
        if self._fingerprint is None:
            digest = hashlib.blake2b(digest_size=16)
            for part in (COUNTER_VERSION, self.tokenizer.to_str(), self.chat_template,
                         json.dumps(self.template_kwargs, sort_keys=True)):
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
                                                f"{first_line(exc)}") from None
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


def load_counter(tokenizer_ref: str, chat_template: str | None = None) -> LossTokenCounter:
    """The counter for a tokenizer (local folder or Hub id) and the chat template training uses with it.

    `chat_template` overrides the checkpoint's own: a path to a Jinja file or
    the template text itself. Either way the template goes through
    `training_chat_template`: kept when it has generation markers, replaced
    by aloe's training template when it is a released one without them
    (Qwen2-VL), refused otherwise.
    """
    checkpoint = load_checkpoint(tokenizer_ref)
    if chat_template is not None:
        template, origin = read_template(chat_template), f"the chat template {chat_template!r}"
    else:
        template, origin = checkpoint.chat_template, f"the chat template of {tokenizer_ref!r}"
    if template is None:
        raise AloeError(f"tokenizer {tokenizer_ref!r} has no chat template (no chat_template.jinja, no chat_template "
                        "in tokenizer_config.json, no chat_template.json); give one with chat_template: (a .jinja "
                        "file)")
    training = training_chat_template(template, origin=origin)
    return LossTokenCounter(tokenizer=checkpoint.tokenizer, chat_template=training,
                            name=tokenizer_ref, template_kwargs=dict(checkpoint.special_tokens))
