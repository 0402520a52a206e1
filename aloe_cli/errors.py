"""The one error type for user mistakes, and its per-record flavour.

Anything raised as `AloeError` is printed as a single line on stderr and exits
with status 1; no traceback is shown unless ALOE_DEBUG=1 (see app.main). `RecordError` additionally knows which
file, line and field went wrong and carries a short machine-readable `reason`
that becomes the reject reason under `--on-error skip`.
"""

from __future__ import annotations


class AloeError(Exception):
    """A mistake in the user's input, options or environment."""


class ConfigValueError(AloeError):
    """A configuration value no run can use. `fields` are the keys it involves; the configuration turns it
    into a usage error naming the flag (exit 2) or a one-line error naming the file and key (exit 1)."""

    def __init__(self, fields: tuple[str, ...], message: str):
        super().__init__(message)
        self.fields = fields


class UsageError(AloeError):
    """An option value no run can use, found by the core rather than while the options were parsed:
    a usage error (exit 2), printed like typer's own as `Error: Invalid value for OPTION: MESSAGE`.
    The message reads on from the option's name."""

    def __init__(self, message: str, option: str):
        super().__init__(message)
        self.option = option


class RecordError(AloeError):
    """One record cannot be processed.

    `reason` is a stable snake_case code used for counters and rejects
    (e.g. `invalid_json`, `missing_field`, `image_missing`); the message is for
    people. `where` is "file:line" (or "file row N") when known.
    """

    def __init__(self, reason: str, message: str, *, where: str | None = None, field: str | None = None):
        self.reason = reason
        self.message = message
        self.where = where
        self.field = field
        super().__init__(self.format())

    def format(self) -> str:
        parts = []
        if self.where:
            parts.append(self.where)
        if self.field:
            parts.append(f"field '{self.field}'")
        parts.append(self.message)
        return ": ".join(parts)

    def located(self, where: str) -> RecordError:
        """Return a copy that names `where` (used when the raiser did not know it)."""
        if self.where:
            return self
        # The copy keeps the original traceback, so ALOE_DEBUG=1 shows where the problem was found.
        return RecordError(self.reason, self.message, where=where, field=self.field).with_traceback(
            self.__traceback__)


class OutputClosed(Exception):
    """stdout was closed by the reader (`aloe ... | head`): stop quietly, exit 0."""


class Terminated(BaseException):
    """SIGTERM arrived (SLURM preemption, `timeout`, `docker stop`): unwind like Ctrl-C, so every `finally`
    removes its temporary files, then exit 128 + the signal number. A BaseException, so that no
    `except Exception` takes it for an error of the record at hand."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        # What the run leaves behind, when it is more than nothing (set by the code that unwinds, e.g. the
        # checkpoints a training run keeps); app.main prints it after the signal's name.
        self.outcome: str | None = None


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
