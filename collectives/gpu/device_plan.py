"""What the persistent ring kernel reads: the primitive program as an int64 table, launch sizes, counters.

Pure NumPy, no GPU: the device executor (device_ring.py) and the simulator tests build the same tables.
"""
from functools import lru_cache

import numpy as np

from ringlab.kernels.ring_kernel import (ALIGNED, FINAL, FROM_SRC, LEFT, MAX_SLICES, NRANKS, PROG_COLS, REDUCE, RIGHT,
                                         TABLE_COLS)
from ringlab.primitives import ring_allreduce_program
from ringlab.schedule import chunk_bounds

__all__ = ["program_table", "launch_shape", "address_row"]


@lru_cache(maxsize=128)
def _program_rows(nranks, count, rank):
    bounds = chunk_bounds(count, nranks)
    rows = []
    for prim in ring_allreduce_program(rank, nranks)[1:]:       # primitive 0 (send) moves no data
        lo, hi = bounds[prim.chunk]
        bits = (REDUCE if prim.reduce else 0) | (FINAL if prim.final else 0) | (FROM_SRC if prim.index == 1 else 0)
        rows.append((lo, hi, bits, -1 if prim.reread is None else prim.reread))
    return tuple(rows)


def program_table(nranks, count, ranks):
    """int64 [len(ranks) * (2N-2), PROG_COLS]: each listed rank's primitives 1..2N-2 (lo, hi, bits, reread)."""
    rows = [row for r in ranks for row in _program_rows(nranks, count, r)]
    return np.array(rows, dtype=np.int64).reshape(-1, PROG_COLS)


def launch_shape(nranks, count, itemsize, max_parts):
    """(parts P, slices K) for one call: one block and one slice for small chunks (latency: every slice is a
    flag hop), up to ``max_parts`` blocks and MAX_SLICES slices of >= 256 KB per block for large ones."""
    chunk_bytes = -(-count // max(nranks, 1)) * itemsize
    parts = int(max(1, min(max_parts, chunk_bytes // (64 << 10))))
    slices = int(max(1, min(MAX_SLICES, chunk_bytes // (parts * (256 << 10)))))
    return parts, slices


def address_row(src, out, left_src, left_out, my_flags, left_flags, right_flags, status, trace, calls, rank, nranks):
    """One rank's row of the kernel's address table (integers: device addresses and ranks)."""
    row = [src, out, left_src, left_out, my_flags, left_flags, right_flags, status, trace, calls, 0, 0, 0, 0]
    row[LEFT], row[RIGHT], row[NRANKS] = (rank - 1) % nranks, (rank + 1) % nranks, nranks
    row[ALIGNED] = int(all(int(a) % 16 == 0 for a in (src, out, left_src, left_out)))
    assert len(row) == TABLE_COLS
    return row
