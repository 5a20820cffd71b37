"""Errors a collective raises instead of hanging or corrupting data."""

__all__ = ["CollectiveError", "CollectiveTimeout", "CollectiveMismatch", "default_timeout"]

import os


class CollectiveError(RuntimeError):
    """Base class for ringlab collective failures."""


class CollectiveTimeout(CollectiveError):
    """A peer did not make progress within the timeout (dead, stuck, or not in this collective)."""

    def __init__(self, message, peer=None):
        super().__init__(message)
        self.peer = peer


class CollectiveMismatch(CollectiveError, ValueError):
    """Ranks called the same collective with different arguments (count, dtype, op, ...)."""


def default_timeout():
    """Seconds a blocking wait may take: $RINGLAB_TIMEOUT (0 or 'none' disables), default 300."""
    raw = os.environ.get("RINGLAB_TIMEOUT", "300").strip().lower()
    if raw in ("", "0", "none", "inf"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"RINGLAB_TIMEOUT must be a number of seconds or 'none', got {raw!r}") from None
    return value if value > 0 else None
