"""Pure schedules: how a buffer is cut into chunks and which chunk moves where at each ring step."""
# No I/O lives here. The executors, the walkthrough and the tests all read these tables, so the
# picture in the docs is the code that runs.

from dataclasses import dataclass

__all__ = ["chunk_bounds", "RingStep", "ring_reduce_scatter_schedule", "ring_allgather_schedule",
           "ring_allreduce_schedule", "reduce_scatter_owner",
           "fold_layout", "virtual_rank", "real_rank"]


def chunk_bounds(count, nranks):
    """Split ``count`` elements into ``nranks`` contiguous chunks; returns [(start, stop), ...].

    The remainder is spread over the first chunks (sizes differ by at most one), so any
    count works: count < nranks gives empty trailing chunks, nranks == 1 gives one chunk.
    """
    if nranks < 1:
        raise ValueError(f"nranks must be >= 1, got {nranks}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    base, extra = divmod(count, nranks)
    bounds, start = [], 0
    for c in range(nranks):
        stop = start + base + (1 if c < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class RingStep:
    """One step of one rank: send chunk ``send_chunk`` to ``send_to``; receive chunk ``recv_chunk``
    from ``recv_from`` and reduce it into the local copy (``reduce``) or overwrite it."""
    phase: str          # "reduce-scatter" or "all-gather"
    step: int           # 0 .. N-2 within the phase
    rank: int
    send_to: int
    send_chunk: int
    recv_from: int
    recv_chunk: int
    reduce: bool


def reduce_scatter_owner(rank, nranks, rotate=0):
    """Chunk that ``rank`` holds fully reduced after the ring reduce-scatter.

    Convention (the ring derivation's): with ``rotate=0`` rank r owns chunk (r + 1) mod N. ``rotate`` relabels
    chunks (schedule chunk c is data chunk (c + rotate) mod N); ``rotate=-1`` makes rank r own chunk r,
    which is what the ``reduce_scatter`` API returns.
    """
    return (rank + 1 + rotate) % nranks


def ring_reduce_scatter_schedule(rank, nranks, rotate=0):
    """Steps of the ring reduce-scatter for ``rank``.

    At step s (0..N-2) rank r sends chunk (r - s) mod N to r+1 and receives chunk (r - s - 1) mod N
    from r-1, adding it into its own copy. The chunk received at step s is the one sent at step s+1,
    so every chunk walks once around the ring collecting one addend per rank.
    """
    n, r = nranks, rank
    return [RingStep("reduce-scatter", s, r, (r + 1) % n, (r - s + rotate) % n,
                     (r - 1) % n, (r - s - 1 + rotate) % n, True) for s in range(n - 1)]


def ring_allgather_schedule(rank, nranks, rotate=0):
    """Steps of the ring all-gather for ``rank``, starting from the reduce-scatter's ownership.

    At step s rank r sends chunk (r + 1 - s) mod N (the one it owns at s = 0, else the one it just
    received) and receives chunk (r - s) mod N from r-1, overwriting its copy.
    """
    n, r = nranks, rank
    return [RingStep("all-gather", s, r, (r + 1) % n, (r + 1 - s + rotate) % n,
                     (r - 1) % n, (r - s + rotate) % n, False) for s in range(n - 1)]


def ring_allreduce_schedule(rank, nranks):
    """The 2(N-1) steps of ring all-reduce: reduce-scatter then all-gather."""
    return ring_reduce_scatter_schedule(rank, nranks) + ring_allgather_schedule(rank, nranks)


# Recursive doubling and Rabenseifner fold N ranks onto the largest power of two p <= N.
def fold_layout(nranks):
    """(p, rem): the largest power of two p <= N and the rem = N - p ranks folded away."""
    p = 1 << (nranks.bit_length() - 1)
    return p, nranks - p


def virtual_rank(rank, rem):
    """Rank within the power-of-two group, or -1 for a rank folded into its partner."""
    if rank < 2 * rem:
        return -1 if rank % 2 == 0 else rank // 2
    return rank - rem


def real_rank(vrank, rem):
    """The real rank of power-of-two group member ``vrank`` (inverse of ``virtual_rank``)."""
    return 2 * vrank + 1 if vrank < rem else vrank + rem
