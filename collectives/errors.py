"""Errors a collective raises instead of hanging or corrupting data, and the settings that bound them.

Environment (read at each call, so it must be the same on every rank):
    RINGLAB_TIMEOUT            seconds a blocking wait may take (default 300; 0 or 'none' = no limit)
    RINGLAB_ABORT_ON_TIMEOUT   1 (default): a timeout prints the error and aborts MPI_COMM_WORLD with
                               exit code ABORT_EXIT_CODE; 0: raise CollectiveTimeout to the caller
"""

__all__ = ["CollectiveError", "CollectiveTimeout", "CollectiveMismatch", "default_timeout", "resolve_timeout",
           "abort_on_timeout_enabled", "env_flag", "ABORT_EXIT_CODE", "DEFAULT_TIMEOUT_S"]

import math
import os

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


def env_flag(name, default):
    """Boolean environment switch: 1/true/yes/on or 0/false/no/off; anything else is an error."""
    raw = os.environ.get(name, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name} must be 0 or 1, got {raw!r}")


def default_timeout():
    """Seconds a blocking wait may take: $RINGLAB_TIMEOUT (0 or 'none' disables), default 300."""
    raw = os.environ.get("RINGLAB_TIMEOUT", str(DEFAULT_TIMEOUT_S)).strip().lower()
    if raw in ("", "0", "none", "inf"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"RINGLAB_TIMEOUT must be a number of seconds or 'none', got {raw!r}") from None
    return value if value > 0 else None


def resolve_timeout(timeout):
    """A ``timeout=`` argument as seconds or None (no limit): None means $RINGLAB_TIMEOUT's value;
    0, a negative number or inf mean no limit (as in the environment variable)."""
    if timeout is None:
        return default_timeout()
    value = float(timeout)
    if value <= 0 or math.isinf(value):
        return None
    if math.isnan(value):
        raise ValueError("timeout must be a number of seconds, got nan")
    return value


def abort_on_timeout_enabled():
    """$RINGLAB_ABORT_ON_TIMEOUT (default on): abort the job on a timeout instead of raising."""
    return env_flag("RINGLAB_ABORT_ON_TIMEOUT", True)
