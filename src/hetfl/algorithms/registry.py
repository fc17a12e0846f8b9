"""The algorithm registry (kept apart so algorithm modules can import it without cycles)."""

from hetfl.registry import Registry

ALGORITHMS: Registry = Registry("algorithm")
