"""Errors a collective raises instead of hanging or corrupting data, and the timeout they are bounded by.

$RINGLAB_TIMEOUT and $RINGLAB_ABORT_ON_TIMEOUT are read through settings.py (the same on every rank).
"""

__all__ = ["CollectiveError", "CollectiveTimeout", "CollectiveMismatch", "default_timeout", "resolve_timeout",
           "abort_on_timeout_enabled", "ABORT_EXIT_CODE", "DEFAULT_TIMEOUT_S"]

import math

from ringlab import settings

DEFAULT_TIMEOUT_S = 300.0
# sysexits.h EX_TEMPFAIL: "temporary failure, the user is invited to retry" fits a dead or stuck peer.
ABORT_EXIT_CODE = 75


class CollectiveError(RuntimeError):
    """Base class for ringlab collective failures."""


class CollectiveTimeout(CollectiveError):
    """A peer did not make progress within the timeout (dead, stuck, or not in this collective).

    ``peer`` is the rank this rank was waiting on, or None when a collective exchange cannot tell
    which rank is missing. After a timeout the communicator's state is unknown: do not reuse it.
    """

    def __init__(self, message, peer=None, rank=None):
        super().__init__(message)
        self.peer = peer
        self.rank = rank


class CollectiveMismatch(CollectiveError, ValueError):
    """Ranks called the same collective with different arguments (count, dtype, op, ...)."""


def default_timeout():
    """Seconds a blocking wait may take: $RINGLAB_TIMEOUT (0, 'none' or 'inf' disables), default 300."""
    return settings.get("RINGLAB_TIMEOUT")


def resolve_timeout(timeout):
    """A ``timeout=`` argument as seconds or None (no limit): None means $RINGLAB_TIMEOUT's value;
    0 or inf mean no limit (as in the environment variable); negative, NaN or non-numbers are errors."""
    if timeout is None:
        return default_timeout()
    try:
        value = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"timeout must be a number of seconds, got {timeout!r}") from None
    if math.isnan(value) or value < 0:
        raise ValueError(f"timeout must be seconds > 0, or 0/inf for no limit; got {timeout!r}")
    if value == 0 or math.isinf(value):
        return None
    return value


def abort_on_timeout_enabled():
    """$RINGLAB_ABORT_ON_TIMEOUT (default on): abort the job on a timeout instead of raising."""
    return settings.get("RINGLAB_ABORT_ON_TIMEOUT")
