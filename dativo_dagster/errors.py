"""One error hierarchy: terminal errors fail a run at once, transient ones are retried."""

from __future__ import annotations

import re
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


_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestLimitExceeded", "InternalError",
    "ServiceUnavailable", "TooManyRequests", "RequestTimeTooSkewed", "BadGateway", "GatewayTimeout",
}
# an HTTP status in a message, not any number in a path or key: "HTTP 503", "status: 403", "(401)", "503 Service"
_STATUS = (
    r"(?:(?:http|status|code|error|response)[ :=/]*{0}\b|\({0}\)"
    r"|\b{0} (?:forbidden|unauthori|internal|bad gateway|service|gateway))"
)
_TRANSIENT_TEXT = re.compile(
    r"connection (?:refused|reset|aborted)|timed? ?out|temporar(?:y|ily)|try again|network|unreachable|"
    r"slow ?down|throttl|too many requests|service unavailable|broken pipe|could not connect|"
    r"database is locked|server closed the connection|" + _STATUS.format("50[0234]"),
    re.IGNORECASE,
)
_TERMINAL_TEXT = re.compile(
    r"access ?denied|accessdenied|invalidaccesskeyid|signaturedoesnotmatch|forbidden|"
    r"not authori[sz]ed|unauthori[sz]ed|no such bucket|nosuchbucket|authentication failed|" + _STATUS.format("40[13]"),
    re.IGNORECASE,
)
# programming errors: retrying cannot help
_TERMINAL_TYPES = (TypeError, KeyError, AttributeError, AssertionError, NotImplementedError, IndexError, LookupError)
_TRANSIENT_TYPE_NAMES = {
    "CommitFailedException", "CommitStateUnknownException", "OperationalError", "EndpointConnectionError",
    "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError", "ConnectTimeout", "ReadTimeout",
    "ServerError", "ServiceUnavailableError", "TooManyRequestsError", "WaitingForLockException",
}


def _type_names(exc: BaseException) -> set[str]:
    return {cls.__name__ for cls in type(exc).__mro__}


def _matches(exc: BaseException, patterns: Sequence[str]) -> bool:
    names = _type_names(exc)
    text = f"{type(exc).__name__}: {exc}"
    for pattern in patterns:
        if pattern in names:
            return True
        try:
            if re.search(pattern, text):
                return True
        except re.error:
            if pattern in text:
                return True
    return False


def is_transient(exc: BaseException, retryable: Sequence[str] = ()) -> bool:
    """Whether retrying may help: network, throttling, 5xx, commit conflicts; or a spec's ``retryable_errors``.

    Bad input, bad specs, missing files, refused credentials and programming errors are terminal, also
    when they come wrapped in a transient error of ours (a catalog that answers "forbidden").
    """
    if retryable and _matches(exc, retryable):
        return True
    text = str(exc)
    if isinstance(exc, DativoError):
        cause = exc.__cause__
        if cause is not None and cause is not exc and retryable and _matches(cause, retryable):
            return True
        return exc.transient and not _TERMINAL_TEXT.search(text)
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore ClientError
        code = str(response["Error"].get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        return code in _TRANSIENT_CODES or status >= 500 or status == 429
    if isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, _TERMINAL_TYPES):
        return False
    if _TERMINAL_TEXT.search(text):
        return False  # e.g. an OperationalError "password authentication failed"
    if _type_names(exc) & _TRANSIENT_TYPE_NAMES:
        return True
    if isinstance(exc, (ConnectionError, TimeoutError)) or _TRANSIENT_TEXT.search(text):
        return True
    # anything else (an unexpected OSError, a server error we do not know): one more try is cheap
    return isinstance(exc, OSError)


_URI_PASSWORD = re.compile(r"(//[^:/@\s]+:)[^@\s]+@")
_SECRET_PARAMS = re.compile(r"(?i)\b(password|passwd|secret|token|credential|key)=([^&\s]+)")


def redact(text: str, secrets: Sequence[str | None]) -> str:
    """``text`` with every secret value, every URI password and every secret query parameter as ``***``.

    Longer secrets go first, so that a secret holding another (``id:secret`` and ``secret``) leaves no part.
    """
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _SECRET_PARAMS.sub(r"\1=***", _URI_PASSWORD.sub(r"\1***@", text))
