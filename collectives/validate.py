"""Cross-rank agreement before a collective: one tiny, bounded Iallgather instead of a hang.

Every rank contributes a fingerprint of its call (collective, count, dtype, op, algorithm,
in-place-ness) and whether its own argument checks failed. If any rank failed or any field
differs, every rank raises the same InvalidCollectiveCall naming the ranks and values.

The exchange is non-blocking and polled with the transport's bounded wait, so a peer that died
or never called the collective yields CollectiveTimeout (then the abort policy) instead of a hang.
What validation cannot catch: a rank that skips the collective entirely, or that runs with
validation off while the others validate; both end in that timeout.

Switches: ``validate=False`` on a call, or RINGLAB_VALIDATE=0 in the environment (every call of
the process, for benchmarks). Either must be the same on every rank.
"""
import zlib

import numpy as np
from mpi4py import MPI

from ringlab import settings
from ringlab.errors import CollectiveMismatch, resolve_timeout
from ringlab.transport import wait_all

__all__ = ["InvalidCollectiveCall", "checked_call", "validation_enabled", "FIELDS"]

FIELDS = ("collective", "count", "dtype", "op", "algo", "inplace")


class InvalidCollectiveCall(CollectiveMismatch, TypeError):
    """Bad arguments on some rank, or arguments that differ across ranks (raised on every rank)."""


_environment_checked = set()


def validation_enabled():
    """False when RINGLAB_VALIDATE=0 (skip the cross-rank check everywhere, e.g. in benchmarks)."""
    return settings.get("RINGLAB_VALIDATE")


def _code(value):
    if isinstance(value, (bool, int, np.integer)):
        return int(value)
    return zlib.crc32(str(value).encode())


def _ranks(ranks):
    return ",".join(str(r) for r in ranks) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


def _describe(rows, errors):
    """Readable disagreements: each rank's local error, then each field whose values (reprs) differ."""
    parts = [f"rank {rank}: {err}" for rank, err in enumerate(errors) if err is not None]
    for i, field in enumerate(FIELDS):
        by_value = {}
        for rank, row in enumerate(rows):
            by_value.setdefault(row[i], []).append(rank)
        if len(by_value) > 1:
            shown = "; ".join(f"{v} on rank{'s' if len(rs) > 1 else ''} {_ranks(rs)}" for v, rs in by_value.items())
            parts.append(f"{field} differs across ranks: {shown}")
    return parts


def _bounded_allgather(comm, mine, recv, timeout, what):
    """``comm.Iallgather(mine, recv)`` completed within ``timeout`` seconds or CollectiveTimeout."""
    req = comm.Iallgather(mine, recv)

    def describe():
        # A collective cannot tell which rank is missing: say what the likely causes are.
        return (f"rank {comm.rank}: not every rank reached {what} (a rank died or stalled before it, "
                "skipped it, called another collective, or runs with validation off)", None)
    wait_all([req], timeout, describe)


def _bounded_allgather_text(comm, text, timeout, what):
    """Every rank's ``text`` (variable length), gathered with two bounded non-blocking collectives."""
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    lengths = np.empty(comm.size, dtype=np.int64)
    _bounded_allgather(comm, np.array([data.size], dtype=np.int64), lengths, timeout, what)
    everyone = np.empty(int(lengths.sum()), dtype=np.uint8)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    req = comm.Iallgatherv([data, MPI.BYTE], [everyone, (lengths, offsets), MPI.BYTE])
    wait_all([req], timeout, lambda: (f"rank {comm.rank}: a rank left during {what}", None))
    return [everyone[o:o + n].tobytes().decode() for o, n in zip(offsets, lengths)]


def checked_call(comm, validate, signature, local_checks, timeout=None):
    """Run ``local_checks()`` (returns the prepared output) and, if validating, agree across ranks.

    ``signature`` is a tuple in the order of FIELDS. ``timeout`` bounds the exchange like every
    other wait (None: $RINGLAB_TIMEOUT). Without validation a local failure raises only on the
    failing rank (the others then wait for it until their timeout).
    """
    result, error = None, None
    try:
        if comm.size not in _environment_checked:    # every RINGLAB_* value, once per process and N
            settings.check_environment(comm.size)
            _environment_checked.add(comm.size)
        result = local_checks()
    except Exception as exc:  # any local failure must reach the other ranks, or they would hang
        error = exc
    if not validate or comm.size == 1 or not validation_enabled():
        if error is not None:
            raise InvalidCollectiveCall(f"{signature[0]}: {_error_text(error)}") from error
        return result
    mine = np.array([_code(v) for v in signature] + [int(error is not None)], dtype=np.int64)
    everyone = np.empty((comm.size, mine.size), dtype=np.int64)
    what = f"the argument check of {signature[0]}"
    seconds = resolve_timeout(timeout)
    _bounded_allgather(comm, mine, everyone, seconds, what)
    if (everyone == everyone[0]).all() and not everyone[:, -1].any():
        return result
    # Slow path, taken by every rank together: exchange readable values to build one message.
    mine_text = "\x1f".join([repr(v) for v in signature] + ["" if error is None else _error_text(error)])
    rows, errors = [], []
    for text in _bounded_allgather_text(comm, mine_text, seconds, what):
        *values, err = text.split("\x1f")
        rows.append(tuple(values))
        errors.append(err or None)
    parts = _describe(rows, errors)
    # Built only from gathered values, so the text is identical on every rank.
    names = sorted({row[0].strip("'") for row in rows})
    raise InvalidCollectiveCall(f"{' / '.join(names)} called inconsistently: " + " | ".join(parts)) from error


def _error_text(error):
    """``TypeError: unsupported dtype ...``: the type tells a bad argument from a crash."""
    return f"{type(error).__name__}: {error}"
