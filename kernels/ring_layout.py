"""The persistent ring kernels' table layout: address-table columns, program columns, flag bits, status codes.

One place for what the host plan (gpu/device_plan.py) writes and the kernels (ring_kernel, fp8 codecs) read.
"""
from dataclasses import dataclass

__all__ = ["TABLE_COLS", "PROG_COLS", "Codec", "IDENTITY", "STAGE_IN", "STAGE_OUT", "STAGE_COUNT", "REDUCE", "FROM_SRC", "FINAL", "MAX_SLICES", "SLICE_STRIDE", "MAX_PARTS",
           "STATUS_OK", "STATUS_TIMEOUT", "MAX_RANKS_PER_LAUNCH", "check_int"]

# Per rank in the launch, one row of addresses (uint64): buffers, counters, status, trace, and ranks; then the
# codec's columns (0 for the identity codec): our send buffer's codes and scales, our mapping of the left's,
# scale slots per chunk, and primitive 0's chunk (lo, hi, index); then, for a staged identity call, the caller's
# src and out and the element count (the ring runs in place on SRC = OUT = this rank's staging buffer; 0: not staged).
(SRC, OUT, LEFT_SRC, LEFT_OUT, MY_FLAGS, LEFT_FLAGS, RIGHT_FLAGS, STATUS, TRACE, CALLS, LEFT, RIGHT, NRANKS,
 ALIGNED, SEND_CODES, SEND_SCALES, LEFT_CODES, LEFT_SCALES, CHUNK_BLOCKS, FIRST_LO, FIRST_HI, FIRST_CHUNK,
 STAGE_IN, STAGE_OUT, STAGE_COUNT) = range(25)
TABLE_COLS = 25                     # ALIGNED: 1 when src, out and the left's buffers are 16-byte aligned
# Per rank, per primitive 1..2N-2 (send, primitive 0, has no row): lo, hi, flag bits, reread (-1: none), chunk.
PROG_COLS = 5
REDUCE, FROM_SRC, FINAL = 1, 2, 4
MAX_SLICES = 8
SLICE_STRIDE = 64                   # counter values per primitive per call: base = call * (2N-1) * SLICE_STRIDE
MAX_PARTS = 64                      # blocks per rank; flags[p] is part p's counter, calls[p] its call count
STATUS_OK, STATUS_TIMEOUT = 0, 1    # status words: code, peer rank waited on, primitive index
MAX_RANKS_PER_LAUNCH = 64


def check_int(name, value, lo=None, hi=None):
    """``value`` as an int, or a ValueError naming ``name``: bools, floats and strings are refused, bounds inclusive
    (the launch arguments' one check: group, max_slices, threads, slice_bytes, ...)."""
    import numpy as np
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
            (lo is not None and value < lo) or (hi is not None and value > hi):
        span = f" in {lo}..{hi}" if lo is not None and hi is not None else f" >= {lo}" if lo is not None else ""
        raise ValueError(f"{name} must be an integer{span}, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class Codec:
    """How a chunk travels between ranks, fixed when the kernel is compiled.

    ``identity``: the right neighbour reads the elements themselves from this rank's buffers. ``fp8``
    (``fmt``, ``block``): codes + fp32 block scales in a per-rank send buffer the right has mapped
    (kernels/fp8_ring_codec.py): ``send`` and ``recv_reduce_send`` encode into it, ``recv_*`` decode the
    left's, the owner's ``recv_reduce_copy_send`` keeps fp32 and encodes the final chunk once.
    """
    name: str
    fmt: str = ""
    block: int = 0


IDENTITY = Codec("identity")
