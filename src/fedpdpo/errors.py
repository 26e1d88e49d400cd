"""User-facing errors.

Every problem caused by the user's input (a bad record, an unknown config key, a missing model path) is raised as a
:class:`FedPDPOError`. The CLI prints it as one line and exits with code 2, without a traceback, so that a message
like ``data.jsonl:17: field 'chosen' is empty`` is what the user sees first.
"""

from __future__ import annotations


class FedPDPOError(Exception):
    """An error in the user's input; the message says what, where, and what to do."""

    exit_code = 2


class ConfigError(FedPDPOError):
    """A bad config key or value (the message names the key)."""


class DataError(FedPDPOError):
    """A bad data file or record (the message names file and line or row)."""
