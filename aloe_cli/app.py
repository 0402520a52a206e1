"""The `aloe` command: a Typer root that imports a command's module only when it runs.

`aloe --help` must stay fast and must not import torch or transformers, so the
root knows each command by name and module path; heavy imports live inside
the command functions.
"""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys

import typer
from typer.core import TyperGroup

try:  # typer carries its own copy of click (its exceptions are not click's)
    from typer._click import exceptions as click_errors
except ImportError:  # an older typer, on click itself
    from click import exceptions as click_errors

from aloe_cli import __version__
from aloe_cli.console import ensure_stderr
from aloe_cli.errors import AloeError, OutputClosed, Terminated, UsageError
from aloe_cli.options import HelpContext

# name -> (module under aloe_cli.commands, one-line help shown by `aloe --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "dedup": ("dedup", "Remove training records whose images leak from evaluation sets (perceptual hash)."),
    "sample-data": ("sample_data", "Write the bundled demo data set (train JSONL + evaluation TSV with leaks)."),
    "mix": ("mix", "Mix sources to target shares of loss tokens over domain x modality (shuffled, seeded)."),
    "perplexity": ("perplexity", "Answer perplexity per record; reject trivial/noisy answers per source."),
    "score": ("score", "LVLM judge rates each sample 1-5 (local model or OpenAI-compatible server); per-source min."),
    "eval": ("eval", "Benchmarks (MCQ, yes/no, open with an LLM judge), adversarial robustness, results tables."),
    "infer": ("infer", "Answer prompts with images (one question, or a JSONL of records); grounded boxes."),
    "report": ("report", "Merge the --report files of a job array's shards into one summary (aloe report merge)."),
    "train": ("train", "Stage-1 SFT on TRL + DeepSpeed ZeRO-3 (the published recipe); --slurm writes the job script."),
    "adv-train": ("adv_train", "Stage-2 SFT from a stage-1 model on adversarially perturbed medical samples."),
    "demo": ("demo", "The whole recipe on a synthetic task in minutes on a CPU: curate, train, evaluate, infer."),
}


class LazyGroup(TyperGroup):
    """Resolve subcommands on demand so unrelated modules are never imported."""

    context_class = HelpContext  # (help wrapped as every command's is)

    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, name: str) -> object:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"aloe_cli.commands.{COMMANDS[name][0]}")
        command = typer.main.get_command(module.app)
        command.name = name
        return command

    def format_commands(self, ctx: typer.Context, formatter) -> None:
        # Listing commands from the table avoids importing every command module for --help.
        with formatter.section("Commands"):
            formatter.write_dl([(name, short) for name, (_, short) in COMMANDS.items()])

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as interrupt:  # past typer, which would turn it into a silent exit 130
            raise _Interrupted(interrupt) from None

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        """click's own loop, except that a usage error (an unknown option, a missing one, a bad value or choice,
        from any command) is one `aloe: error:` line instead of click's usage lines or typer's boxes."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except _Interrupted as wrapped:  # main() says what the run keeps
            raise wrapped.interrupt from None
        except click_errors.NoArgsIsHelpError as error:  # `aloe score` alone: the help, as asked for
            error.show()
            sys.exit(error.exit_code)
        except click_errors.ClickException as error:
            _traceback_if_debugging(error)
            print(f"aloe: error: {usage_error_line(error)}", file=sys.stderr)
            _detach_stdout()
            sys.exit(error.exit_code)
        except typer.Abort:  # end of input at a prompt
            print("aloe: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(code) and Ctrl-C (130) come back as a code


class _Interrupted(BaseException):
    """Ctrl-C carried past typer's own handling, so the closing line can say what the run keeps."""

    def __init__(self, interrupt: KeyboardInterrupt):
        super().__init__()
        self.interrupt = interrupt


def usage_error_line(error: click_errors.ClickException) -> str:
    """click's message on one line, flags named bare (`--batch-size`, not `'--batch-size'`), and where help is."""
    message = " ".join(error.format_message().split())
    message = re.sub(r"'(-{1,2}[\w-]+(?: ?/ ?-{1,2}[\w-]+)*)'", r"\1", message)
    message = message.replace(": Value error, ", ": ", 1)  # the validator's own prefix says nothing
    ctx = getattr(error, "ctx", None)
    if isinstance(error, click_errors.UsageError) and ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f" (see {ctx.command_path} {ctx.help_option_names[0]})"
    return message


app = typer.Typer(
    cls=LazyGroup,
    name="aloe",
    help="Build medical vision-language models: leak-free, quality-filtered, token-balanced training data.",
    no_args_is_help=True,
    add_completion=False,  # root() adds Typer's two completion options, with the shell as an optional value
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        print(f"aloe {__version__}")
        raise typer.Exit()


SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


COMPLETION_OPTIONS = ("--install-completion", "--show-completion")
DETECT_SHELL = ""  # the value main() gives a completion option that names no shell


def _completion(action):
    """Typer's --install-completion / --show-completion callback, for the shell named, or, when none is, the
    shell this runs in (detected as Typer does)."""
    def callback(ctx: typer.Context, param, value: str | None):
        if value is None or ctx.resilient_parsing:
            return value
        from typer.completion import completion_init

        completion_init()
        shell = value.strip().lower() if value != DETECT_SHELL else _current_shell()
        if shell not in SHELLS:
            raise typer.BadParameter(f"{shell!r} is not a shell aloe completes: name one of {', '.join(SHELLS)}")
        return action(ctx, param, shell)

    return callback


def _current_shell() -> str:
    try:
        import shellingham

        return shellingham.detect_shell()[0]
    except Exception:  # not installed, or no shell among the parent processes
        raise typer.BadParameter(f"cannot tell which shell this is: name it ({', '.join(SHELLS)})") from None


def _show_completion(ctx: typer.Context, param, shell: str) -> None:
    from typer.completion import show_callback

    show_callback(ctx, param, shell)


def _install_completion(ctx: typer.Context, param, shell: str) -> None:
    from typer.completion import install_callback

    install_callback(ctx, param, shell)


@app.callback()
def root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
    install_completion: str | None = typer.Option(
        None, "--install-completion", metavar="[SHELL]", is_eager=True,
        expose_value=False, callback=_completion(_install_completion),
        help="Install tab completion for SHELL (bash, zsh, fish, powershell; default: this shell)."),
    show_completion: str | None = typer.Option(
        None, "--show-completion", metavar="[SHELL]", is_eager=True,
        expose_value=False, callback=_completion(_show_completion),
        help="Print the completion script for SHELL (default: this shell), to install it by hand."),
    # The deepspeed launcher puts --local_rank=N before the command; training reads the rank from the environment.
    local_rank: int | None = typer.Option(None, "--local_rank", "--local-rank", hidden=True),
) -> None:
    """Build medical vision-language models: leak-free, quality-filtered, token-balanced training data."""


# Set to 1 to see the traceback behind a one-line error (like the `hf` CLI's HF_DEBUG).
DEBUG_ENV = "ALOE_DEBUG"


def _without_deepspeed_cpu_notice() -> None:
    """DeepSpeed, imported by transformers/accelerate/TRL in every model command, warns "Setting accelerator to
    CPU" on every machine without a GPU, where running on the CPU is the plan. A filter on its logger, set before
    it is imported (its import resets the level, not the filters), drops that one line when torch sees no CUDA
    device; where torch does see one and DeepSpeed still falls back to the CPU, the warning stays."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Setting accelerator to CPU"):
            return True
        torch = sys.modules.get("torch")
        try:
            return bool(torch is not None and torch.cuda.device_count() > 0)
        except Exception:  # a broken CUDA set-up: say what DeepSpeed says
            return True

    logging.getLogger("DeepSpeed").addFilter(keep)


def _name_the_shell(args: list[str]) -> list[str]:
    """`aloe --show-completion` (or --install-completion) with no shell after it: the option's value says "this
    shell", as Typer's own flag does, while `--show-completion zsh` names one."""
    args = list(args)
    for index, arg in enumerate(args):
        if not arg.startswith("-"):  # a command: its own options follow
            break
        if arg in COMPLETION_OPTIONS and (index + 1 == len(args) or args[index + 1].startswith("-")):
            args.insert(index + 1, DETECT_SHELL)
            break
    return args


def main(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, exit 1 for bad input, 2 for bad usage (typer's own),
    130 for Ctrl-C, 143 for SIGTERM."""
    ensure_stderr()
    _without_deepspeed_cpu_notice()
    if "_ALOE_COMPLETE" in os.environ:  # the shell asks for completions (the script --show-completion prints)
        from typer.completion import completion_init

        completion_init()
    _handle_sigterm()
    try:
        try:
            app(args=_name_the_shell(sys.argv[1:] if argv is None else argv), prog_name="aloe")
        finally:
            _flush_stdout()  # a closed pipe or a full device surfaces here, not at interpreter shutdown
    except UsageError as error:  # found after option parsing (e.g. in a --config file's flags): one line too
        _traceback_if_debugging(error)
        print(f"aloe: error: Invalid value for {error.option}: {error}", file=sys.stderr)
        _detach_stdout()
        sys.exit(2)
    except AloeError as error:
        _fail(error, str(error))
    except (OutputClosed, BrokenPipeError):
        _quiet_closed_pipe()
    except Terminated as terminated:
        _traceback_if_debugging(terminated)
        outcome = terminated.outcome or "nothing was written (temporary files removed)"
        print(f"aloe: terminated by {signal.Signals(terminated.signum).name}; {outcome}", file=sys.stderr)
        _detach_stdout()
        sys.exit(128 + terminated.signum)
    except KeyboardInterrupt as interrupt:
        _traceback_if_debugging(interrupt)
        outcome = getattr(interrupt, "outcome", None)
        print("aloe: interrupted" + (f"; {outcome}" if outcome else ""), file=sys.stderr)
        sys.exit(130)
    except OSError as error:  # an I/O failure no command foresaw (a full disk, a vanished folder): one line
        where = f": {error.filename}" if error.filename else ""
        _fail(error, f"{error.strerror or error}{where}")


def _flush_stdout() -> None:
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise AloeError(f"cannot write standard output: {exc.strerror or exc}") from None


def _fail(error: BaseException, message: str) -> None:
    _traceback_if_debugging(error)
    print(f"aloe: error: {message}", file=sys.stderr)
    _detach_stdout()
    sys.exit(1)


def _handle_sigterm() -> None:
    """SIGTERM raises Terminated in the main thread, so the run unwinds and cleans up like Ctrl-C."""
    main_pid = os.getpid()
    raised = False

    def terminate(signum: int, frame) -> None:
        nonlocal raised
        if os.getpid() != main_pid:  # a forked worker that has not set its own handlers yet: it holds nothing
            os._exit(128 + signum)
        if raised:  # cleanup is under way: once is enough
            return
        raised = True
        raise Terminated(signum)

    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        try:
            signal.signal(signal.SIGTERM, terminate)
        except ValueError:  # not the main thread (aloe called as a library): leave signals alone
            pass


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _traceback_if_debugging(error: BaseException) -> None:
    """With ALOE_DEBUG=1, print the full traceback, including the exceptions
    that `raise ... from None` hid behind the one-line message."""
    if not debugging():
        return
    import traceback

    link: BaseException | None = error
    seen: set[int] = set()
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        link.__suppress_context__ = False
        link = link.__cause__ or link.__context__
    traceback.print_exception(error, file=sys.stderr)
    sys.stderr.flush()


def _quiet_closed_pipe() -> None:
    """`aloe ... | head`: the reader left, which is not an error."""
    _detach_stdout()
    sys.exit(0)


def _detach_stdout() -> None:
    """Point stdout at devnull, dropping what is still buffered, so the interpreter's final flush cannot
    raise again (a closed pipe, a full device) or write after an error."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
