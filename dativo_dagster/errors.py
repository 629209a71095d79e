"""One error hierarchy: terminal errors fail a run at once, transient ones are retried."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

# the parser that re.compile itself uses: the backtracking check below sees exactly the pattern re will run
from re import _constants, _parser


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


class DeploymentError(TerminalError):
    """The deployment's environment variables are set only in part (CONTRACT 6); ``missing`` names the unset ones."""

    def __init__(self, message: str, *, missing: Sequence[str]):
        self.missing = list(missing)
        super().__init__(message)


class SourceError(TerminalError):
    """A source file cannot be found, decoded or parsed; names the file and, where known, the line."""

    def __init__(self, message: str, *, path: str, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}: {message}")


class NothingToReadError(TerminalError):
    """No source file matched the spec's paths, or a file cannot hold a single record of the declared layout
    (``path`` names it)."""

    def __init__(self, message: str, *, path: str | None = None):
        self.path = path
        super().__init__(f"{path}: nothing readable: {message}" if path is not None else message)


class ValidationFailedError(TerminalError):
    """Strict mode found invalid rows; the message lists every failing field."""


class DatabaseSourceError(TerminalError):
    """A database source cannot be read and retrying cannot help: a missing variable, a refused login, an unknown
    table or column. The message names the spec; it never holds the URL's password."""


class DatabaseUnavailableError(TransientError):
    """The database could not be reached or dropped the connection: the RetryPolicy tries the run's read again."""


class CommitError(TransientError):
    """The catalog could not be reached, or failed, while committing."""


class CatalogAccessError(TerminalError):
    """The catalog refused the credentials (a REST token endpoint's ``invalid_client``, 401/403, a database's
    "password authentication failed"): retrying with the same ones cannot help."""


class MainDivergedError(TerminalError):
    """``publish: true`` found ``main`` at a snapshot the branch has never held (someone committed to ``main``
    directly): publishing would drop those rows from ``main``, so the run commits nothing."""

    def __init__(self, *, table: str, branch: str, main_snapshot_id: int, branch_snapshot_id: int):
        self.table = table
        self.branch = branch
        self.main_snapshot_id = main_snapshot_id
        self.branch_snapshot_id = branch_snapshot_id
        super().__init__(
            f"{table}: cannot publish {branch} to main: main is at snapshot {main_snapshot_id}, which is not in the"
            f" history of {branch} (head: snapshot {branch_snapshot_id}); something committed to main directly, and"
            f" moving main would drop those rows. Nothing was committed. Bring those rows into {branch} (or decide"
            f" to drop them), set main to a snapshot of {branch} (pyiceberg:"
            f" table.manage_snapshots().set_current_snapshot({branch_snapshot_id}).commit()) and run again;"
            " or remove target.publish"
        )


class DuplicateKeysError(TerminalError):
    """A merge's commit, evaluated on its staged snapshot before the catalog commit, would leave a key more than once
    on the branch (the blocking ``unique_key`` check): nothing is committed or published. ``found`` holds the counts
    (``merge.DuplicateKeys``); examples never appear in the message (a key may be PII)."""

    def __init__(self, *, table: str, branch: str, key: list[str], found: object):
        self.found = found
        duplicated = getattr(found, "duplicate_keys", 0)
        super().__init__(
            f"{table}@{branch}: the merge would leave {duplicated} key(s) ({', '.join(key)}) more than once on the"
            f" branch, so nothing was committed (the unique_key check's metadata lists examples). The branch held"
            " them before this run (rows written by another writer, or before the key was recorded): remove the"
            " duplicates, or run once with write_mode: overwrite, then merge again"
        )


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
    r"not authori[sz]ed|unauthori[sz]ed|no such bucket|nosuchbucket|authentication failed|"
    # a full disk or quota: the retry would stream everything again into the same wall (a spec can still list
    # them in retryable_errors when space is freed by something else)
    r"no space left on device|file too large|disk quota exceeded|" + _STATUS.format("40[13]"),
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


# retry_config.retryable_errors: each entry is matched against "<Class>: <message>" cut to this many characters,
# so that a pattern's running time has a bound whatever an error's text holds (a message can quote a whole file)
MAX_MATCHED_CHARS = 1000
MAX_PATTERN_CHARS = 200
# each long repeat (*, +, {n,}, {n,m} with m - n > 20) can multiply the matching time by the text's length:
# ".*.*.*x" takes minutes on 1,000 characters, ".*.*x" a fraction of a second
MAX_LONG_REPEATS = 2
LONG_REPEAT_SPAN = 20


def retryable_pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a ``retryable_errors`` entry, or ``None`` when it can.

    An entry is a regular expression (a class name is one too) that must compile, be at most
    ``MAX_PATTERN_CHARS`` long and be safe from catastrophic backtracking: no repeated group that itself
    holds a variable repeat or an alternation (``(a+)+``, ``(a|ab)*``), at most ``MAX_LONG_REPEATS`` long
    repeats (``*``, ``+``, ``{n,}``, ``{n,m}`` with m - n > 20).
    """
    if not pattern:
        return "expected an exception class name or a regular expression; got an empty text"
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"a pattern is at most {MAX_PATTERN_CHARS} characters; this one has {len(pattern)}"
    try:
        re.compile(pattern)
    except re.error as exc:
        return f"invalid regular expression {pattern!r}: {exc}"
    repeats = (_constants.MAX_REPEAT, _constants.MIN_REPEAT, _constants.POSSESSIVE_REPEAT)
    long_repeats = 0

    def children(value: object) -> list[_parser.SubPattern]:
        if isinstance(value, _parser.SubPattern):
            return [value]
        if isinstance(value, (tuple, list)):
            return [child for item in value for child in children(item)]
        return []

    def walk(sub: _parser.SubPattern, repeated: bool) -> str | None:
        nonlocal long_repeats
        for op, value in sub:
            if op in repeats:
                low, high, body = value
                if repeated and low != high:
                    return "a repeat inside a repeated group"
                if high - low > LONG_REPEAT_SPAN:
                    long_repeats += 1
                found = walk(body, repeated or high > 1)
            elif op is _constants.BRANCH and repeated:
                return "an alternation inside a repeated group"
            else:
                found = next(filter(None, (walk(child, repeated) for child in children(value))), None)
            if found:
                return found
        return None

    nested = walk(_parser.parse(pattern), repeated=False)
    if nested:
        return (
            f"{pattern!r} has {nested}, which can take exponential time on some texts (catastrophic backtracking);"
            " write it without repeating a group that repeats or alternates inside"
        )
    if long_repeats > MAX_LONG_REPEATS:
        return (
            f"{pattern!r} has {long_repeats} long repeats (*, +, {{n,}}, {{n,m}}); at most {MAX_LONG_REPEATS} are"
            " allowed, as each can multiply the matching time by the length of the error text"
        )
    return None


@functools.lru_cache(maxsize=256)
def _compiled(pattern: str) -> re.Pattern[str] | None:
    """The pattern compiled, or ``None`` when it is not a safe regular expression (then it is plain text)."""
    return re.compile(pattern) if retryable_pattern_problem(pattern) is None else None


def _matches(exc: BaseException, patterns: Sequence[str]) -> bool:
    names = _type_names(exc)
    text = f"{type(exc).__name__}: {exc}"[:MAX_MATCHED_CHARS]
    for pattern in patterns:
        if pattern in names:
            return True
        compiled = _compiled(pattern)
        # specs refuse unsafe patterns; a caller that passes one anyway gets a plain substring test
        found = compiled.search(text) if compiled is not None else pattern in text
        if found:
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
