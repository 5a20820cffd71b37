"""GPU check of the async collectives' CuPy path (run by hand on a CUDA machine, not by pytest).

    mpirun -n 4 python tests/mpi/async_device_check.py

Checks: results vs a float64 reference for all three collectives; the communication waits for
a kernel still running on the caller's stream (ready event); kernels queued after wait() see the
result (stream wait, not a host block); bad ``out`` raises on every rank at wait(); the collective
finishes (host stamp) while a long matmul loop still runs on the caller's stream.
"""
import sys
import time

import numpy as np
from mpi4py import MPI

from ringlab import InvalidCollectiveCall
from ringlab.arrays import use_local_gpu
from ringlab.schedule import chunk_bounds
from ringlab.work import allgather_async, allreduce_async, reduce_scatter_async

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank
use_local_gpu(comm)
import cupy as cp  # noqa: E402

say = print if rank == 0 else (lambda *a, **k: None)


def host_data(count, r):
    return (((np.arange(count) * 7 + r * 13 + 1) % 9) - 4).astype(np.float64)


ref_sum = lambda count: sum(host_data(count, r) for r in range(n))  # noqa: E731

# 1. correctness, odd counts, count < N
for count in (1, n + 1, 100_003):
    for dtype in ("float32", "float64"):
        x = cp.asarray(host_data(count, rank).astype(dtype))
        got = allreduce_async(x).wait(120)
        assert isinstance(got, cp.ndarray) and np.array_equal(cp.asnumpy(got), ref_sum(count)), ("allreduce", count, dtype)
        lo, hi = chunk_bounds(count, n)[rank]
        got = reduce_scatter_async(x).wait(120)
        assert np.array_equal(cp.asnumpy(got), ref_sum(count)[lo:hi]), ("reduce_scatter", count, dtype)
        got = allgather_async(x).wait(120)
        want = np.stack([host_data(count, r) for r in range(n)])
        assert np.array_equal(cp.asnumpy(got), want), ("allgather", count, dtype)
say("1. results vs float64 reference: OK")

# 2. the input is produced by a kernel still queued on the caller's stream at launch time
big = cp.ones((4096, 4096), dtype=cp.float32)
x = cp.zeros(1 << 20, dtype=cp.float32)
for _ in range(20):
    big = big @ big * (1.0 / 4096)          # keeps the stream busy
x += big[0, 0] * (rank + 1)                 # x is final only after the matmuls
out = allreduce_async(x, out=x).wait(120)
y = out * 1                                  # queued after wait(): must see the reduced values
assert float(cp.abs(y - n * (n + 1) / 2).max()) == 0.0, "stream ordering broken (ready/done events)"
say("2. ready event before the comm, stream wait after it: OK")

# 3. bad out on one rank raises the same error on every rank at wait()
bad_out = cp.empty(5 if rank == 0 else 10, dtype=cp.float32)
try:
    allreduce_async(cp.ones(10, dtype=cp.float32), out=bad_out).wait(120)
    raise AssertionError("bad out accepted")
except InvalidCollectiveCall as exc:
    assert "shape" in str(exc), exc
say("3. bad out raises on every rank at wait(): OK")

# 4. progress while the caller's stream computes
a = cp.ones((4096, 4096), dtype=cp.float32)
cp.cuda.get_current_stream().synchronize()
comm.Barrier()
work = allreduce_async(cp.full(1 << 22, rank + 1, dtype=cp.float32))
t_launch = time.perf_counter()
end = cp.cuda.Event()
for _ in range(200):
    a = a @ a * (1.0 / 4096)
end.record()
end.synchronize()
compute_end = time.perf_counter()
res = work.wait(120)
assert float(cp.abs(res - n * (n + 1) / 2).max()) == 0.0
ahead = comm.gather((compute_end - work.finished_at, compute_end - t_launch), root=0)
if rank == 0:
    ok = all(a_ > 0 for a_, _ in ahead)
    print(f"4. collective finished before the compute ended on {'all' if ok else 'NOT all'} ranks: "
          + ", ".join(f"{a_:+.3f}s of {c:.3f}s" for a_, c in ahead))
    sys.exit(0 if ok else 1)
