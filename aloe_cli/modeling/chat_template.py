"""Chat templates: rendering them with generation spans, and THE template training uses.

Loss tokens (the tokens the SFT loss is computed on, which `mix` balances
and `perplexity` scores) are the tokens inside the `{% generation %}` blocks
of the chat template training uses:

- the model's own template when it has generation markers;
- else the training template aloe ships for the model's family, recognised
  by the released template's text. For Qwen2-VL (and Qwen2.5-VL, which
  ships the same template) that is `chat_templates/qwen2_vl_training.jinja`:
  the released text, with a generation block over each assistant turn's
  content and its closing `<|im_end|>\\n`. It marks the same tokens as the
  training template TRL's `SFTTrainer(assistant_only_loss=True)` swaps in
  for that family, so setting it on the processor before training
  (`apply_training_chat_template`) changes nothing TRL trains on; TRL then
  sees markers and keeps it;
- any other template without markers is refused (an `AloeError`): it does
  not say which tokens are learned.

`ChatTemplate.render` renders a template as transformers'
`apply_chat_template` does (same sandboxed jinja2 environment) and returns
the character spans of its generation blocks, with neither torch nor
transformers imported.
"""

from __future__ import annotations

import functools
import json
import re
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from aloe_cli.errors import AloeError, first_line

Messages = list[dict]
Span = tuple[int, int]

TEMPLATES_DIR = Path(__file__).with_name("chat_templates")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# Older names of a message's reasoning; apply_chat_template copies them to `reasoning_content` and `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


@dataclass(frozen=True)
class TemplateFamily:
    """A model family whose released template has no generation markers, and the training template aloe ships."""

    name: str
    released: str  # file in chat_templates/: the released template, as the checkpoints ship it
    training: str  # file in chat_templates/: the same text with generation blocks

    def released_text(self) -> str:
        return _package_template(self.released)

    def training_text(self) -> str:
        return _package_template(self.training)


QWEN2_VL = TemplateFamily("Qwen2-VL", "qwen2_vl.jinja", "qwen2_vl_training.jinja")  # and Qwen2.5-VL: same template
FAMILIES = (QWEN2_VL,)


def has_generation_markers(template: str | dict | None) -> bool:
    """Whether a template has `{% generation %}` blocks (named templates: the default one)."""
    if isinstance(template, dict):
        template = template.get("default")
    return isinstance(template, str) and _GENERATION_TAG.search(template) is not None


def template_family(template: str) -> TemplateFamily | None:
    """The family whose released template this is (surrounding whitespace aside), or None."""
    text = template.strip()
    return next((family for family in FAMILIES if family.released_text().strip() == text), None)


def training_chat_template(template: str | None, *, origin: str = "the model's chat template") -> str:
    """The chat template training uses, given the model's (or the user's) template.

    Its own text when it has generation markers, else aloe's training
    template for its family; an AloeError when it is neither.
    """
    if not template:
        raise AloeError(f"{origin} is missing: there is no chat template to say which tokens training learns")
    if has_generation_markers(template):
        return template
    family = template_family(template)
    if family is None:
        known = ", ".join(family.name for family in FAMILIES)
        raise AloeError(f"{origin} has no {{% generation %}} markers and is not a released template aloe has a "
                        f"training template for ({known}), so it does not say which tokens training learns; give a "
                        "template with markers (a .jinja file, see docs/mix.md)")
    return family.training_text()


def template_of(processing_class: Any) -> str | None:
    """The chat template a processor or tokenizer renders with (named templates: the default one)."""
    for holder in (processing_class, getattr(processing_class, "tokenizer", None)):
        template = getattr(holder, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if isinstance(template, str) and template:
            return template
    return None


def apply_training_chat_template(processing_class: Any) -> str:
    """Set the training chat template on a loaded processor (and its tokenizer); return it.

    Called before building TRL's SFTTrainer, so that TRL finds generation
    markers and trains on exactly the tokens `mix` counted.
    """
    template = training_chat_template(template_of(processing_class))
    for holder in (processing_class, getattr(processing_class, "tokenizer", None)):
        if holder is not None and hasattr(holder, "chat_template"):
            holder.chat_template = template
    return template


@functools.cache
def _package_template(name: str) -> str:
    return (TEMPLATES_DIR / name).read_text(encoding="utf-8")


# ----------------------------------------------------------------------------- rendering

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
            raise AloeError(f"the chat template does not compile: {first_line(exc)}") from None

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


def read_template(value: str) -> str:
    """A `--chat-template` / `chat_template:` value: the template text itself, or a path to a Jinja file."""
    if "{%" in value or "{{" in value:
        return value
    from aloe_cli.data.textfile import read_text_file

    return read_text_file(Path(value).expanduser(), "chat template")
