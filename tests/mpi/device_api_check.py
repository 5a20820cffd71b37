"""MPI worker (GPU): the public API's device routes against the host paths, bit for bit; exits non-zero on failure.

usage: mpirun -n 8 python3 tests/mpi/device_api_check.py
``ringlab.allreduce`` on CuPy arrays with transport="device" (staged and zero-copy sizes), algo="auto", "oneshot",
"twoshot"; ``ringlab.allreduce_fp8`` with transport="device" and the auto route (fp8-ring, fp8-direct): each
equals the same call on NumPy copies of the inputs (the host ring / host FP8 path), and all ranks agree.
"""
import hashlib
import sys

import cupy
import numpy as np
from mpi4py import MPI

import ringlab
from ringlab.arrays import use_local_gpu
from ringlab.gpu.device_small import CAPACITY

comm = MPI.COMM_WORLD
use_local_gpu(comm)
rank, n = comm.rank, comm.size
bad = []


def same_everywhere(arr):
    digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
    return len(set(comm.allgather(digest))) == 1


def check(what, got, want):
    got = cupy.asnumpy(got)
    if not np.array_equal(got.view(np.uint8), want.view(np.uint8)) or not same_everywhere(got):
        bad.append(what)


for count in (1, n - 1 or 1, 1009, 100003, (1 << 20) + 3):           # staged (<= 1 MB) and zero-copy sizes
    x = np.random.default_rng([rank, count]).standard_normal(count).astype(np.float32)
    host = ringlab.allreduce(x)                                        # the host ring
    check(f"allreduce transport=device count={count}", ringlab.allreduce(cupy.asarray(x), transport="device"), host)
    for algo in ("auto", "oneshot", "twoshot"):    # persistent kernels: the ring's fold order, so its bits
        if algo == "auto" or x.nbytes <= CAPACITY:
            check(f"allreduce algo={algo} count={count}", ringlab.allreduce(cupy.asarray(x), algo=algo), host)
    for algo in ("fp8-ring", "fp8-direct"):
        want = ringlab.allreduce_fp8(x, algo=algo)
        for transport in ("device", None):
            got = ringlab.allreduce_fp8(cupy.asarray(x), algo=algo, transport=transport)
            check(f"allreduce_fp8 {algo} transport={transport} count={count}", got, want)
bad = [b for group in comm.allgather(bad) for b in group]
if rank == 0:
    print("\n".join(bad[:20]) if bad else f"device_api_check OK: N={n}", flush=True)
sys.exit(1 if bad else 0)
