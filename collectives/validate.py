"""Cross-rank agreement before a collective: one tiny Allgather instead of a hang.

Every rank contributes a fingerprint of its call (collective, count, dtype, op, algorithm,
in-place-ness) and whether its own argument checks failed. If any rank failed or any field
differs, every rank raises the same InvalidCollectiveCall naming the ranks and values.
"""
import zlib

import numpy as np

from .errors import CollectiveMismatch

__all__ = ["InvalidCollectiveCall", "checked_call", "FIELDS"]

FIELDS = ("collective", "count", "dtype", "op", "algo", "inplace")


class InvalidCollectiveCall(CollectiveMismatch, TypeError):
    """Bad arguments on some rank, or arguments that differ across ranks (raised on every rank)."""


def _code(value):
    if isinstance(value, (int, np.integer, bool)):
        return int(value)
    return zlib.crc32(str(value).encode())


def _describe(rows, errors):
    parts = []
    for rank, err in enumerate(errors):
        if err is not None:
            parts.append(f"rank {rank}: {err}")
    for i, field in enumerate(FIELDS):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            by_value = {}
            for rank, v in enumerate(values):
                by_value.setdefault(v, []).append(rank)
            shown = "; ".join(f"{v!r} on rank{'s' if len(rs) > 1 else ''} {_ranks(rs)}" for v, rs in by_value.items())
            parts.append(f"{field} differs across ranks: {shown}")
    return parts


def _ranks(ranks):
    return ",".join(str(r) for r in ranks) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


def checked_call(comm, validate, signature, local_checks):
    """Run ``local_checks()`` (returns the prepared output) and, if ``validate``, agree across ranks.

    ``signature`` is a tuple in the order of FIELDS. Without validation a local failure raises
    only on the failing rank (the others would then wait for it until their timeout).
    """
    result, error = None, None
    try:
        result = local_checks()
    except (TypeError, ValueError) as exc:
        error = exc
    if not validate or comm.size == 1:
        if error is not None:
            raise InvalidCollectiveCall(f"{signature[0]}: {error}") from error
        return result
    mine = np.array([_code(v) for v in signature] + [int(error is not None)], dtype=np.int64)
    everyone = np.empty((comm.size, mine.size), dtype=np.int64)
    comm.Allgather(mine, everyone)
    if (everyone == everyone[0]).all() and not everyone[:, -1].any():
        return result
    # Slow path, taken by every rank together: exchange readable values to build one message.
    readable = comm.allgather((tuple(signature), None if error is None else str(error)))
    rows = [r[0] for r in readable]
    errors = [r[1] for r in readable]
    parts = _describe(rows, errors)
    text = f"{signature[0]} called inconsistently: " + " | ".join(parts)
    raise InvalidCollectiveCall(text) from error

