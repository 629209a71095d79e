"""One error hierarchy: terminal errors fail a run at once, transient ones are retried."""

from __future__ import annotations

from collections.abc import Sequence


class DativoError(Exception):
    """Root of every error this package raises on purpose."""

    transient = False


class TerminalError(DativoError):
    """Retrying cannot help: bad spec, bad input, refused credentials."""


class TransientError(DativoError):
    """May succeed when tried again: network, throttling, catalog commit conflicts."""

    transient = True


class SpecError(TerminalError):
    """One or more asset specs break the format; ``problems`` has one line per problem."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in asset specs:\n" + "\n".join(f"  {p}" for p in self.problems)
        )


class SourceError(TerminalError):
    """A source file cannot be found, decoded or parsed; names the file and, where known, the line."""

    def __init__(self, message: str, *, path: str, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class NothingToReadError(TerminalError):
    """No source file matched the spec's paths."""


class ValidationFailedError(TerminalError):
    """Strict mode found invalid rows; the message lists every failing field."""


class CommitError(TransientError):
    """The catalog refused or could not be reached while committing."""


class StorageError(TransientError):
    """The object store could not be reached."""
