"""MPI worker: the FP8 IPC ring's message plan, executed with NumPy, equals the MPI FP8 ring bit for bit.

Every rank runs allreduce_fp8 over MPI (host path), then gathers all inputs and executes
ringlab.gpu.fp8_ipc.fp8_ring_message_plan for every rank in one process, exactly as the IPC executor
does (message j of rank r from left's message j-1), and compares its own rank's result. Prints "OK".
"""
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ml_dtypes import bfloat16  # noqa: E402

from ringlab import allreduce_fp8, chunk_bounds  # noqa: E402
from ringlab.gpu.fp8_ipc import fp8_ring_message_plan  # noqa: E402
from ringlab.kernels.codec import HostFp8Codec  # noqa: E402

comm = MPI.COMM_WORLD
N, R = comm.size, comm.rank


def run_plan(xs, codec, op):
    """Every rank's result of the IPC ring, simulated: slots[r][j] is rank r's message j."""
    n, count = len(xs), xs[0].size
    bounds = chunk_bounds(count, n)
    plans = [fp8_ring_message_plan(r, n) for r in range(n)]
    slots = [[None] * (2 * n - 1) for _ in range(n)]
    outs = [np.full_like(x, np.nan) for x in xs]
    for j in range(2 * n - 1):          # step-major: left's message j-1 always exists before step j
        for r in range(n):
            chunk, kind = plans[r][j]
            lo, hi = bounds[chunk]
            msg = codec.message(hi - lo)
            peer = slots[(r - 1) % n][j - 1] if j else None
            if kind == "quantize":
                codec.quantize(xs[r][lo:hi], msg)
            elif kind in ("hop", "final"):
                final = kind == "final"
                codec.hop(xs[r][lo:hi], peer, msg, out=outs[r][lo:hi] if final else None,
                          divide_by=n if final and op == "avg" else 1)
            else:
                msg[...] = peer
                codec.dequantize(msg, outs[r][lo:hi])
            slots[r][j] = msg
    return outs


checks = 0
for count in (0, 1, N - 1 if N > 1 else 2, 1009, 4 * 128 * N + 3):
    for dtype in (np.float32, bfloat16):
        for fmt, block, op in (("e4m3", 128, "sum"), ("e5m2", 32, "avg")):
            rng = np.random.default_rng([count, R])
            x = (rng.standard_normal(count) * 10.0 ** rng.uniform(-3, 3, count)).astype(dtype)
            want = allreduce_fp8(x, fmt=fmt, block=block, op=op, comm=comm)
            xs = comm.allgather(x)
            got = run_plan(xs, HostFp8Codec(fmt, block), op) if N > 1 else [x.copy()]
            for r in range(N):     # every simulated rank holds the same bytes
                assert got[r].view(np.uint8).tobytes() == got[0].view(np.uint8).tobytes(), (count, r)
            assert got[R].view(np.uint8).tobytes() == want.view(np.uint8).tobytes(), \
                f"plan != MPI ring: N={N} count={count} {np.dtype(dtype).name} {fmt}/{block} {op}"
            checks += 1
if R == 0:
    print(f"OK {checks} plan checks on {N} ranks")
