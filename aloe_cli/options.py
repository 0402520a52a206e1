"""Option types shared by every command (typer `Annotated` aliases).

Commands declare e.g. `input: InputOpt = None` so the same flag has the same
name, short form and help text everywhere.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from enum import Enum, StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

# ----------------------------------------------------------------------------- checks shared by the options
# A value no command can use is a usage error (exit 2), caught while the options are parsed, before any input is
# read or any model is loaded.

def finite(value: float | None) -> float | None:
    """Callback for float options: inf and nan are never meaningful (typer's min/max let inf through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"must be a finite number, got {value}")
    return value


def not_empty(value):
    """Callback for text options (and lists of them): an empty or blank value is a usage error, never "the
    current folder" or "no value"."""
    values = value if isinstance(value, list) else [value]
    if any(item is not None and not str(item).strip() for item in values):
        raise typer.BadParameter("is empty")
    return value


def _check_shard(value: str | None) -> str | None:
    if value is None:
        return None
    from aloe_cli.data.shard import Shard
    from aloe_cli.errors import AloeError

    try:
        Shard.parse(value)
    except AloeError as error:
        raise typer.BadParameter(str(error).removeprefix("--shard ").removeprefix("--shard: ")) from None
    return value


def _cap_workers(value: int) -> int:
    """More worker processes than CPUs only adds forks (100000 would stall the machine): cap, with a note."""
    from aloe_cli import console
    from aloe_cli.data.shard import available_cpus

    cpus = available_cpus()
    if value > cpus:
        console.log(f"aloe: note: --workers {value} is more than the {cpus} CPU(s) this process may use; "
                    f"using {cpus}")
        return cpus
    return value


class OnError(str, Enum):
    fail = "fail"
    skip = "skip"


InputOpt = Annotated[
    list[str] | None,
    typer.Option("-i", "--input", callback=not_empty,
                 help="Input file(s) or globs (JSONL[.gz], parquet, dataset folder, VLMEvalKit TSV). Repeatable. "
                 "Default: stdin."),
]
OutputOpt = Annotated[
    str, typer.Option("-o", "--output", callback=not_empty,
                      help="Output file (.jsonl, .jsonl.gz, .parquet). Default: stdout.")
]
RejectsOpt = Annotated[
    Path | None, typer.Option("--rejects", help="Write dropped records here, each with aloe.reject = {stage, reason}.")
]
ReportOpt = Annotated[
    Path | None, typer.Option("--report", help="Write the closing summary as JSON (and, when the run finishes, "
                              "the completion marker FILE.done).")
]
ShardOpt = Annotated[
    str | None,
    typer.Option("--shard", callback=_check_shard,
                 help="Process shard K/N (0-based) of the input. Default: from SLURM_ARRAY_TASK_ID/"
                 "SLURM_ARRAY_TASK_COUNT, else 0/1."),
]
ResumeOpt = Annotated[
    bool, typer.Option("--resume", help="Skip this shard (exit 0) when its --report's completion marker "
                       "FILE.done exists: rerun a job array and only unfinished shards run.")
]
WorkersOpt = Annotated[
    int, typer.Option("--workers", min=1, callback=_cap_workers,
                      help="Worker processes for CPU-bound work; capped at the CPUs this process may use "
                      "(its CPU affinity: taskset, SLURM's CPUs per task, cgroups), with a note.")
]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Records per batch.")]
OnErrorOpt = Annotated[
    OnError, typer.Option("--on-error", help="fail: stop at the first bad record (exit 1). skip: send it to --rejects.")
]
# For a command without --rejects (eval): a skipped item is counted, by reason, in its summary.
OnErrorCountedOpt = Annotated[
    OnError, typer.Option("--on-error", help="fail: stop at the first bad item (exit 1). skip: leave it out, "
                          "counted by reason in the summary.")
]
KeepAllOpt = Annotated[
    bool, typer.Option("--keep-all", help="Annotate and flag records but drop none (thresholds can be applied later).")
]
ImageRootOpt = Annotated[
    Path | None,
    typer.Option("--image-root", exists=True, file_okay=False,
                 help="Folder that relative image paths resolve against. Default: the input file's folder "
                 "(the working directory for stdin)."),
]

KeepDicomBytesOpt = Annotated[
    bool,
    typer.Option("--keep-dicom-bytes",
                 help="Pass embedded DICOM data (data URIs, parquet/dataset image bytes) through as it is, header "
                 "and patient data included. Default: its pixels are re-encoded on read as PNG, rendered like every "
                 "stage sees them (window/level, 8 bits), without the header. DICOM referenced by path stays a path."),
]

class BboxFormat(str, Enum):
    xyxy = "xyxy"
    xywh = "xywh"


BboxFormatOpt = Annotated[
    BboxFormat,
    typer.Option("--bbox-format",
                 help="Pixel boxes in objects/bbox are [x1, y1, x2, y2] (xyxy) or [x, y, w, h] (xywh). Records are "
                 "grounded (boxes -> answer text) by the first command that reads them."),
]


# ----------------------------------------------------------------------------- help that reads at 80 columns
# Help is click's plain layout (two columns, wrapped at the terminal's width up to 80, long option names with their
# help on the next line), never a table whose columns cut words with "…". Options keep their help panels as
# sections; values show a short metavar (N, X, TEXT, PATH, [a|b]), flags none; indented paragraphs of a command's
# help (its examples) are printed as written, never rewrapped.

_METAVARS = {"int": "N", "int range": "N", "float": "X", "float range": "X", "str": "TEXT", "path": "PATH",
             "dir": "DIR", "file": "FILE"}


def _metavar(label: str) -> str:
    """typer's `<type>` label as a metavar: `<list[str]>` -> TEXT (repeatable), `<a|b>` -> [a|b]."""
    label = label.strip("<>")
    if label.startswith("list[") and label.endswith("]"):
        label = label[5:-1]
    if "|" in label:
        return f"[{label}]"
    return _METAVARS.get(label, label.upper())


def verbatim_code(text: str) -> str:
    """Mark every indented paragraph (an example block) so that it is printed as written, not rewrapped."""
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join("\b\n" + paragraph if paragraph[:1].isspace() else paragraph for paragraph in paragraphs)


_HYPHEN = "\u2011"  # a non-breaking hyphen, while the text is wrapped


def _unbroken(text: str) -> str:
    return re.sub(r"(?<=\w)-(?=\w)", _HYPHEN, text)


class HelpFormatter(TyperCommand.context_class.formatter_class):
    """click's formatter, except that a line never breaks inside a hyphenated word (`--freeze-projector`)."""

    def write_text(self, text: str) -> None:
        super().write_text(_unbroken(text))

    def write_dl(self, rows, *args, **kwargs) -> None:
        super().write_dl([(first, _unbroken(second)) for first, second in rows], *args, **kwargs)

    def getvalue(self) -> str:
        return super().getvalue().replace(_HYPHEN, "-")


class HelpContext(TyperCommand.context_class):
    formatter_class = HelpFormatter


class _HelpLayout:
    """What AloeCommand and AloeGroup share: the help text's examples kept as written, options by panel,
    subcommands with their whole first paragraph."""

    context_class = HelpContext

    def format_help_text(self, ctx, formatter) -> None:
        if self.help:
            formatter.write_paragraph()
            with formatter.indentation():
                formatter.write_text(verbatim_code(self.help.partition("\f")[0]))

    def format_options(self, ctx, formatter) -> None:
        sections: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            if param.param_type_name == "option" and param.metavar is None and not param.is_flag:
                label = param.display_type(ctx)
                if label:
                    param.metavar = _metavar(label)
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":  # its name says what it is: no `<type>` after it
                record = (re.sub(r" <[^<>]*>$", "", record[0]), record[1])
            section = "Arguments" if param.param_type_name == "argument" else (
                getattr(param, "rich_help_panel", None) or "Options")
            sections.setdefault(section, []).append(record)
        for name, records in sections.items():
            with formatter.section(name):
                formatter.write_dl(records)
        if hasattr(self, "list_commands"):
            rows = []
            for name in self.list_commands(ctx):
                command = self.get_command(ctx, name)
                if command is not None and not command.hidden:
                    summary = command.short_help or inspect.cleandoc(command.help or "").split("\n\n")[0]
                    rows.append((name, " ".join(summary.split())))
            if rows:
                with formatter.section("Commands"):
                    formatter.write_dl(rows)


class AloeCommand(_HelpLayout, TyperCommand):
    pass


class AloeGroup(_HelpLayout, TyperGroup):
    pass


class CommandApp(typer.Typer):
    """A Typer app whose commands render their help in aloe's layout."""

    def command(self, *args: Any, cls: type | None = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or AloeCommand, **kwargs)


def command_app() -> typer.Typer:
    """The Typer app a command module registers its one command on."""
    return CommandApp(cls=AloeGroup, add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False)


# ----------------------------------------------------------------------------- model-backed commands

def _check_model(value: str) -> str:
    if not value or not value.strip():
        raise typer.BadParameter("is empty: give a model folder or a Hub id")
    return value


ModelOpt = Annotated[
    str,
    typer.Option("--model", callback=_check_model,
                 help="Model folder or Hub id (Qwen2-VL family), loaded with AutoProcessor + "
                 "AutoModelForImageTextToText."),
]


# ----------------------------------------------------------------------------- generating commands (score, eval, infer)
# Their backend flags are generated once from the fields of `BackendConfig` (help, bounds, choices and checks live
# in its field metadata), as `commands/_train_options.py` generates training's from `TrainConfig`. `eval` also gets
# each one's `--judge-` twin for its judge.

BACKEND_PANEL = "Generation backend"
JUDGE_PANEL = "Judge backend"
_CHOICES: dict[tuple[str, ...], type[StrEnum]] = {}


def _choice_type(name: str, choices: tuple[str, ...]) -> type[StrEnum]:
    """One StrEnum per choice list (typer offers choices through Enums; a StrEnum reads as its plain string)."""
    if choices not in _CHOICES:
        _CHOICES[choices] = StrEnum(name.title().replace("_", ""), {choice: choice for choice in choices})
    return _CHOICES[choices]


def _checked(check) -> Callable:
    """Callback for a text flag: not empty, and `check` (which raises AloeError naming the flag) passes."""
    from aloe_cli.errors import AloeError

    def callback(value):
        not_empty(value)
        if value is not None and check is not None:
            try:
                check(value)
            except AloeError as error:
                raise typer.BadParameter(re.sub(r"^--[\w-]+:? ", "", str(error))) from None
        return value

    return callback


def _backend_fields():
    import dataclasses

    from aloe_cli.modeling.backends.factory import BackendConfig

    return [f for f in dataclasses.fields(BackendConfig) if f.name != "model"]


def _backend_parameter(f, default, judge: bool, panel: str | None = BACKEND_PANEL) -> inspect.Parameter:
    meta = f.metadata
    flag = f"--{'judge-' if judge else ''}{f.name.replace('_', '-')}"
    base = {"int": int, "float": float, "bool": bool}.get(str(f.type).split(" |")[0], str)
    choice = _choice_type(f.name, meta["choices"]) if meta["choices"] else None
    extra: dict[str, Any] = {}
    if base is float:
        extra["callback"] = finite
    elif base is str and choice is None:
        extra["callback"] = _checked(meta["check"])
    if meta["min"] is not None:
        extra["min"] = meta["min"]
    if meta["max"] is not None:
        extra["max"] = meta["max"]
    help_text = meta["help"]
    if judge:
        note = meta["judge_help"] or ("default: off" if base is bool else "default: the model's")
        help_text = f"Like --{f.name.replace('_', '-')}, for the judge ({note})."
        if not (meta["own"] or base is bool):
            default = None  # None: take the model's value
    if choice is not None and default is not None:
        default = choice(default)
    value_type: Any = choice or base
    annotation = value_type if default is not None else value_type | None
    option = typer.Option(flag, help=help_text, rich_help_panel=JUDGE_PANEL if judge else panel, **extra)
    name = f"{'judge_' if judge else ''}{f.name}"
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=Annotated[annotation, option])


def backend_option(name: str) -> Any:
    """The `Annotated` type of one backend flag, for a command that loads a model without generating
    (perplexity's --device, --dtype, ...)."""
    f = next(f for f in _backend_fields() if f.name == name)
    return _backend_parameter(f, f.default, judge=False, panel=None).annotation


def with_backend_options(*, judge: bool = False, **defaults: Any) -> Callable[[Callable], Callable]:
    """Give a generating command the backend flags (and with `judge`, their `--judge-` twins), with this
    command's `defaults` (e.g. `timeout=120.0`). The command receives them as `backend_config` (and
    `judge_config`): `BackendConfig`s with an empty `model`, checked (`factory.check_config`) before it runs."""
    fields = _backend_fields()
    unknown = set(defaults) - {f.name for f in fields}
    if unknown:
        raise TypeError(f"not a BackendConfig field: {', '.join(sorted(unknown))}")

    def decorate(function: Callable) -> Callable:
        own = [p for p in inspect.signature(function, eval_str=True).parameters.values()
               if p.name not in ("backend_config", "judge_config")]
        generated = [_backend_parameter(f, defaults.get(f.name, f.default), judge=False) for f in fields]
        if judge:
            generated += [_backend_parameter(f, f.default, judge=True) for f in fields]

        def command(**options: Any) -> Any:
            model = _config_from_options(options, fields, "")
            if judge:
                options["judge_config"] = _config_from_options(options, fields, "judge_", model)
            return function(**options, backend_config=model)

        command.__name__, command.__qualname__, command.__doc__ = (
            function.__name__, function.__qualname__, function.__doc__)
        command.__module__ = function.__module__
        command.__signature__ = inspect.Signature(own + generated)  # type: ignore[attr-defined]
        return command

    return decorate


def _config_from_options(options: dict[str, Any], fields, prefix: str, model=None):
    """Take this config's flags out of `options`; a judge flag not given takes the model's value."""
    from aloe_cli.modeling.backends.factory import BackendConfig, check_config

    values = {}
    for f in fields:
        value = options.pop(prefix + f.name)
        if isinstance(value, Enum):
            value = value.value
        if value is None and model is not None and not f.metadata["own"]:
            value = getattr(model, f.name)
        values[f.name] = value
    config = BackendConfig(model="", **values)
    check_config(config, prefix.replace("_", "-"))
    return config


DeviceOpt = backend_option("device")
DtypeOpt = backend_option("dtype")
TrustRemoteCodeOpt = backend_option("trust_remote_code")
AttnImplementationOpt = backend_option("attn_implementation")
MaxNewTokensOpt = Annotated[
    int, typer.Option("--max-new-tokens", min=1, max=1 << 20, help="Longest reply, in tokens.")
]
