"""Async collectives match a float64 reference, stay apart when concurrent, and fail clearly."""
import sys
import time

import numpy as np
from mpi4py import MPI

from ringlab import CollectiveTimeout, InvalidCollectiveCall, allgather, allreduce
from ringlab.schedule import chunk_bounds
from ringlab.work import allgather_async, allreduce_async, reduce_scatter_async

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank


def data(count, dtype, r, salt=0):
    i = np.arange(count, dtype=np.int64)
    return (((i * 7 + r * 13 + salt * 3 + 1) % 9) - 4).astype(dtype)


def reference(count, op, salt=0):
    stack = np.stack([data(count, np.float64, r, salt) for r in range(n)])
    return {"sum": stack.sum(0), "avg": stack.mean(0), "max": stack.max(0), "min": stack.min(0)}[op]


def check(got, ref, what, rtol=0.0):
    got = np.asarray(got, dtype=np.float64).reshape(-1)
    bad = int((~(np.abs(got - ref.reshape(-1)) <= rtol * np.abs(ref.reshape(-1)))).sum())
    assert bad == 0, f"rank {rank}: {what}: {bad} wrong elements"


# 1. every collective, several counts (odd, < N, not divisible by N), dtypes and ops
for count in (0, 1, n - 1 if n > 1 else 1, 1001, 4 * n + 3):
    for dtype in ("float32", "float64", "int32"):
        for op in ("sum", "max", "avg"):
            if op == "avg" and dtype == "int32":
                continue
            rtol = 2 * np.finfo(dtype).eps if op == "avg" else 0.0
            x = data(count, dtype, rank)
            w = allreduce_async(x, op=op)
            out = w.wait(timeout=60)
            assert w.done and w.test() and w.finished_at >= w.started_at
            check(out, reference(count, op), f"allreduce_async {count} {dtype} {op}", rtol)
            lo, hi = chunk_bounds(count, n)[rank]
            rs = reduce_scatter_async(x, op=op).wait(60)
            check(rs, reference(count, op)[lo:hi], f"reduce_scatter_async {count} {dtype} {op}", rtol)
        ag = allgather_async(data(count, dtype, rank)).wait(60)
        assert ag.shape == (n, count)
        check(ag, np.stack([data(count, np.float64, r) for r in range(n)]), f"allgather_async {count} {dtype}")

# in place, 2-D input, caller-provided out
x = data(6 * 5, "float32", rank).reshape(6, 5)
assert allreduce_async(x, out=x).wait(60) is x
check(x, reference(30, "sum"), "in-place allreduce_async")

# 2. many concurrent async collectives on one communicator, plus blocking ones on the same
#    communicator from the main thread while they are in flight: nothing may mix.
works, expected = [], []
for k in range(12):
    count = 1000 + 37 * k
    works.append(allreduce_async(data(count, "float64", rank, salt=k)))
    expected.append(reference(count, "sum", salt=k))
    if k % 4 == 0:
        check(allreduce(data(77, "float64", rank, salt=100 + k)), reference(77, "sum", salt=100 + k),
              "blocking allreduce while async ones are in flight")
ags = [allgather_async(np.full(3, rank * 10 + k, dtype=np.int64)) for k in range(3)]
blocking_ag = allgather(np.full(2, rank, dtype=np.int64))
for k, w in enumerate(works):
    check(w.wait(60), expected[k], f"concurrent allreduce_async #{k}")
for k, w in enumerate(ags):
    assert (w.wait(60)[:, 0] == np.arange(n) * 10 + k).all(), "concurrent allgather_async mixed"
assert (blocking_ag[:, 0] == np.arange(n)).all()

# 3. errors: a count mismatch is raised at wait() on every rank, and later collectives still work
if n > 1:
    w = allreduce_async(np.ones(10 + (rank == 0), dtype=np.float32))
    try:
        w.wait(60)
        raise AssertionError("mismatched counts did not raise")
    except InvalidCollectiveCall as exc:
        assert "count differs" in str(exc), exc
    assert not w.test() or w.done
try:
    allreduce_async(np.ones(4, dtype=np.float32), op="median").wait(60)
    raise AssertionError("bad op did not raise")
except InvalidCollectiveCall as exc:
    assert "median" in str(exc)
check(allreduce_async(data(5, "float32", rank)).wait(60), reference(5, "sum"), "allreduce after errors")

# 4. wait(timeout) raises CollectiveTimeout while a peer is late, then succeeds once it arrives
if n > 1:
    comm.Barrier()
    if rank == 0:
        w = allreduce_async(data(100, "float32", rank))
        t0 = time.perf_counter()
        try:
            w.wait(timeout=0.2)
            raise AssertionError("wait(0.2) returned although rank 1 had not joined")
        except CollectiveTimeout as exc:
            assert "not done within 0.2 s" in str(exc), exc
        assert time.perf_counter() - t0 < 5 and not w.done
        check(w.wait(60), reference(100, "sum"), "allreduce_async after a timed-out wait")
    else:
        time.sleep(1.5 if rank == 1 else 0)
        check(allreduce_async(data(100, "float32", rank)).wait(60), reference(100, "sum"), "late rank")

print(f"rank {rank}: async collectives OK", flush=True)
sys.exit(0)
