"""The collective completes while the main thread computes (no MPI calls) with NumPy matmuls.

Proof by timestamps: the progress thread stamps ``finished_at`` before the compute loop ends.
Also prints T_comp, T_comm, T_both for information (never asserted: cores are shared).
"""
import sys
import time

import numpy as np
from mpi4py import MPI

from ringlab.work import allreduce_async

comm = MPI.COMM_WORLD
rank, n = comm.rank, comm.size
count = int(sys.argv[1]) if len(sys.argv) > 1 else 1 << 18
compute_s = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0

a = np.ones((256, 256), dtype=np.float32)
t0 = time.perf_counter()
for _ in range(5):
    a @ a
per_matmul = (time.perf_counter() - t0) / 5
# Every rank does the same number of matmuls: the slowest rank's estimate, so each computes >= compute_s.
reps = comm.allreduce(max(1, int(compute_s / max(per_matmul, 1e-6))), op=MPI.MAX)


def compute():
    acc = np.zeros_like(a)
    for _ in range(reps):
        np.matmul(a, a, out=acc)   # releases the GIL; no MPI call in here
    return acc


x = np.full(count, rank + 1, dtype=np.float32)
expected = n * (n + 1) / 2

comm.Barrier()
t0 = time.perf_counter()
compute()
t_comp = time.perf_counter() - t0

comm.Barrier()
t0 = time.perf_counter()
allreduce_async(x).wait(120)
t_comm = time.perf_counter() - t0

comm.Barrier()
t0 = time.perf_counter()
work = allreduce_async(x)
compute()
compute_end = time.perf_counter()
out = work.wait(120)
t_both = time.perf_counter() - t0

assert (out == expected).all(), f"rank {rank}: wrong all-reduce result"
assert work.finished_at < compute_end, (
    f"rank {rank}: the collective finished {work.finished_at - compute_end:+.3f} s after the compute "
    "ended: no progress while the caller computed")
ahead = comm.gather(compute_end - work.finished_at, root=0)
if rank == 0:
    print(f"progress during compute OK on all {n} ranks: collective done {min(ahead):.3f} s (min) before the "
          f"compute ended; T_comp {t_comp:.3f} s, T_comm {t_comm:.3f} s, T_both {t_both:.3f} s", flush=True)
