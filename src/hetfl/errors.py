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
