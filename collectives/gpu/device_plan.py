"""What the persistent ring kernels read: the primitive program as an int64 table, launch sizes, counters.

Pure NumPy, no GPU: the device executors (device_ring.py, device_fp8.py) and the simulator tests build the same tables.
"""
from functools import lru_cache

import numpy as np

from ringlab.kernels.ring_layout import (ALIGNED, CHUNK_BLOCKS, FINAL, FIRST_CHUNK, FIRST_HI, FIRST_LO, FROM_SRC, LEFT,
                                         LEFT_CODES, LEFT_SCALES, MAX_PARTS, MAX_SLICES, NRANKS, PROG_COLS, REDUCE,
                                         RIGHT, SEND_CODES, SEND_SCALES, SLICE_STRIDE, STAGE_COUNT, STAGE_IN,
                                         STAGE_OUT, TABLE_COLS, check_int)
from ringlab.primitives import ring_allreduce_program
from ringlab.schedule import chunk_bounds

__all__ = ["program_table", "launch_shape", "check_max_parts", "parts_for", "check_max_slices", "address_row",
           "chunk_blocks", "first_chunk", "fp8_send_layout"]


@lru_cache(maxsize=128)
def _program_rows(nranks, count, rank):
    bounds = chunk_bounds(count, nranks)
    rows = []
    for prim in ring_allreduce_program(rank, nranks)[1:]:       # primitive 0 (send) moves no data
        lo, hi = bounds[prim.chunk]
        bits = (REDUCE if prim.reduce else 0) | (FINAL if prim.final else 0) | (FROM_SRC if prim.index == 1 else 0)
        rows.append((lo, hi, bits, -1 if prim.reread is None else prim.reread, prim.chunk))
    return tuple(rows)


def program_table(nranks, count, ranks):
    """int64 [len(ranks) * (2N-2), PROG_COLS]: each listed rank's primitives 1..2N-2 (lo, hi, bits, reread, chunk)."""
    rows = [row for r in ranks for row in _program_rows(nranks, count, r)]
    return np.array(rows, dtype=np.int64).reshape(-1, PROG_COLS)


def launch_shape(nranks, count, itemsize, max_parts, slice_bytes=256 << 10, max_slices=MAX_SLICES):
    """(parts P, slices K) for one call: one block and one slice for small chunks (latency: every slice is a
    flag hop), up to ``max_parts`` blocks and ``max_slices`` (<= SLICE_STRIDE) slices of >= ``slice_bytes`` per
    block for large ones."""
    chunk_bytes = -(-count // max(nranks, 1)) * itemsize
    parts = int(max(1, min(max_parts, MAX_PARTS, chunk_bytes // (64 << 10))))
    slices = int(max(1, min(check_max_slices(max_slices), chunk_bytes // (parts * max(int(slice_bytes), 1)))))
    return parts, slices


def check_max_parts(max_parts):
    """``max_parts`` as an int in 1..MAX_PARTS, or None (None or 0: the executor's default), or a clear error: a
    rank's flag words hold MAX_PARTS counters, so more blocks would write past them."""
    zero = not isinstance(max_parts, bool) and isinstance(max_parts, (int, np.integer)) and max_parts == 0
    if max_parts is None or zero:
        return None
    return check_int("max_parts", max_parts, 1, MAX_PARTS)


def parts_for(max_parts, sms, blocks_per_sm, sharing):
    """Blocks per rank: ``max_parts`` (checked by check_max_parts; None: the most that fit) such that every block of
    the ``sharing`` ranks on this GPU is resident at once at ``blocks_per_sm`` per SM: they wait on each other, so
    one that cannot start would stall its peers until the timeout, which would name the wrong cause."""
    fit = max(1, min(MAX_PARTS, sms * blocks_per_sm // max(sharing, 1)))
    if max_parts is not None and max_parts > fit:
        raise ValueError(f"max_parts={max_parts}: {sharing} rank(s) share this GPU's {sms} SMs at {blocks_per_sm} "
                         f"block(s) per SM, so at most {fit} blocks per rank can be resident at once (the kernels "
                         "wait on each other); use max_parts <= that, or None")
    return max_parts or fit


def check_max_slices(max_slices):
    """``max_slices`` as an int, or a clear error: a call's counters hold SLICE_STRIDE items per primitive."""
    return check_int("max_slices", max_slices, 1, SLICE_STRIDE)


def chunk_blocks(count, nranks, block):
    """Scale slots per chunk: blocks of the largest chunk (chunk c's block t has slot c * this + t)."""
    return -(-(-(-count // max(nranks, 1))) // block)


def first_chunk(count, nranks, rank):
    """(lo, hi, chunk) of what ``rank``'s primitive 0 (send) sends."""
    c = ring_allreduce_program(rank, nranks)[0].chunk
    lo, hi = chunk_bounds(count, nranks)[c]
    return lo, hi, c


def fp8_send_layout(capacity, nranks, block):
    """(codes bytes, scales bytes) of one rank's FP8 send buffer for calls of up to ``capacity`` elements."""
    codes = -(-max(int(capacity), 1) // 256) * 256
    return codes, 4 * nranks * max(chunk_blocks(capacity, nranks, block), 1)


def address_row(src, out, left_src, left_out, my_flags, left_flags, right_flags, status, trace, calls, rank, nranks,
                *, send_codes=0, send_scales=0, left_codes=0, left_scales=0, blocks_per_chunk=0, first=(0, 0, 0),
                stage_in=0, stage_out=0, stage_count=0):
    """One rank's row of the kernel's address table (integers: device addresses and ranks); the keywords are the
    FP8 codec's columns (send buffers, scale slots per chunk, primitive 0's (lo, hi, chunk)), 0 for identity, and a
    staged identity call's user buffers and element count (``first`` then names primitive 0's chunk too)."""
    row = [src, out, left_src, left_out, my_flags, left_flags, right_flags, status, trace, calls] + [0] * (TABLE_COLS - 10)
    row[LEFT], row[RIGHT], row[NRANKS] = (rank - 1) % nranks, (rank + 1) % nranks, nranks
    row[ALIGNED] = int(all(int(a) % 16 == 0 for a in (src, out, left_src, left_out)))
    row[SEND_CODES], row[SEND_SCALES], row[LEFT_CODES], row[LEFT_SCALES] = send_codes, send_scales, left_codes, left_scales
    row[CHUNK_BLOCKS] = blocks_per_chunk
    row[FIRST_LO], row[FIRST_HI], row[FIRST_CHUNK] = first
    row[STAGE_IN], row[STAGE_OUT], row[STAGE_COUNT] = stage_in, stage_out, stage_count
    assert len(row) == TABLE_COLS
    return row


def direct_row(src, out, codes, scales, flags, status, trace, calls, rank, blocks_per_chunk, peers):
    """One rank's row of the fp8-direct kernel's table; ``peers``: address of its int64 [N, 3] peer table."""
    from ringlab.kernels.fp8_direct_kernel import DIRECT_COLS
    row = [src, out, codes, scales, flags, status, trace, calls, rank, blocks_per_chunk, peers,
           int(int(src) % 16 == 0 and int(out) % 16 == 0)]
    assert len(row) == DIRECT_COLS
    return row


def hbm_bytes_per_element(path, nranks, block=128, itemsize=4):
    """HBM bytes one rank reads + writes per element of the buffer: "fp32-ring" (identity codec, ``itemsize``),
    "fp8-ring" or "fp8-direct" (codes 1 B, a 4 B scale per ``block``); docs/fp8.md derives them."""
    n, s = int(nranks), 4.0 / block
    if n == 1:
        return 0.0
    if path == "fp32-ring":            # N-1 reduces (src, left's, out) and N-1 copies (left's, out)
        return 5 * itemsize * (n - 1) / n
    x = itemsize
    if path == "fp8-ring":             # send, N-2 hops, final, N-2 forwards, recv; scales: 4N-4 per chunk
        return ((x + 1) + (n - 2) * (x + 2) + (2 * x + 2) + (n - 2) * (x + 2) + (x + 1) + (4 * n - 4) * s) / n
    if path == "fp8-direct":           # encode N-1 chunks; owner: src + N-1 peers' codes + code + out; decode N-1
        return ((n - 1) * (x + 1) + (x + (n - 1) + 1 + x) + (n - 1) * (1 + x) + (3 * n - 2) * s) / n
    raise ValueError(f"unknown path {path!r}; expected fp32-ring, fp8-ring or fp8-direct")
