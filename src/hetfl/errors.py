"""Exceptions that carry a message meant for the user.

A :class:`HetflError` is a *user* error: bad config, missing data, impossible request.  The CLI prints
its message (one paragraph, no traceback) and exits with code 2.  Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class HetflError(Exception):
    """An error the user can fix; its message says what is wrong and what is allowed."""


class ConfigError(HetflError):
    """A configuration value is unknown, mistyped or out of range."""


class DataError(HetflError):
    """A dataset could not be found, fetched, verified or parsed."""


class ClientLost(RuntimeError):
    """No usable reply came back from a client (no node holds it, no reply in time, an unreadable reply).

    A round counts it as a failed client, like an exception raised by the client's own code, but a round
    in which every client was lost is a transport fault, not a bug in the local update."""
