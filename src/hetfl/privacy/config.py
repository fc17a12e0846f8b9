"""The ``[privacy]`` section lives with the config (:class:`hetfl.config.PrivacyConfig`); re-exported here."""

from __future__ import annotations

from hetfl.config import PrivacyConfig

__all__ = ["PrivacyConfig"]
