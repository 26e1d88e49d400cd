"""User-facing errors.

Every problem caused by the user's input (a bad record, an unknown config key, a missing model path) is raised as a
:class:`FedPDPOError`. The CLI prints it as one line and exits with code 2, without a traceback, so that a message
like ``data.jsonl:17: field 'chosen' is empty`` is what the user sees first.
"""

from __future__ import annotations

import errno
import os


class FedPDPOError(Exception):
    """An error in the user's input; the message says what, where, and what to do."""

    exit_code = 2


class ConfigError(FedPDPOError):
    """A bad config key or value (the message names the key)."""


class DataError(FedPDPOError):
    """A bad data file or record (the message names file and line or row)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty), to quote inside a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


#: OSError numbers that mean the environment stopped a write, not a bug: a full disk or quota, a read-only file system,
#: no permission, a file system without locks (some network mounts). User errors like a bad config: one line, exit 2.
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.ENOLCK})


def environment_error(exc: OSError) -> FedPDPOError | None:
    """The one-line error for an OSError caused by the environment (see ENVIRONMENT_ERRNOS), else None."""
    if exc.errno not in ENVIRONMENT_ERRNOS:
        return None
    where = f": {exc.filename}" if exc.filename else ""
    return FedPDPOError(f"{exc.strerror or os.strerror(exc.errno)}{where}")
