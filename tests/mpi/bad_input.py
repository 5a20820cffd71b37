"""MPI worker: bad arguments raise clear errors on every rank, never hang."""
import numpy as np
from mpi4py import MPI

from ringlab import InvalidCollectiveCall, allgather, allreduce, reduce_scatter

comm = MPI.COMM_WORLD
rank = comm.rank


def expect(fn, *words):
    try:
        fn()
    except InvalidCollectiveCall as exc:
        text = str(exc)
        missing = [w for w in words if w not in text]
        assert not missing, f"rank {rank}: message {text!r} lacks {missing}"
        return
    raise AssertionError(f"rank {rank}: no error for {words}")


x = np.arange(10, dtype=np.float32)
expect(lambda: allreduce(np.arange(10, dtype=np.int32), op="avg"), "avg", "int32")
expect(lambda: allreduce(np.arange(10, dtype=np.uint8)), "unsupported dtype uint8")
expect(lambda: allreduce(x, op="mean"), "unknown op 'mean'")
expect(lambda: allreduce(x, algo="nope"), "unknown algo 'nope'")
expect(lambda: allreduce(x, out=np.empty(11, np.float32)), "shape")
expect(lambda: allreduce(x, out=np.empty(10, np.float64)), "dtype")
expect(lambda: allreduce(x, out=np.empty(20, np.float32)[::2]), "C-contiguous")
expect(lambda: reduce_scatter(x, out=np.empty(99, np.float32)), "shape")
expect(lambda: allgather(x, out=np.empty((1, 10), np.float32)) if comm.size > 1 else (_ for _ in ()).throw(
    InvalidCollectiveCall("shape skipped for N=1")), "shape")
if comm.size > 1:
    # Only one rank is wrong: every rank must raise (not hang), naming the culprit.
    expect(lambda: allreduce(x if rank else x.astype(np.float64)), "dtype differs", "rank")
    expect(lambda: allreduce(np.ones(10 + (rank == 1), np.float32)), "count differs")
    expect(lambda: allreduce(x, op="max" if rank == comm.size - 1 else "sum"), "op differs")
    expect(lambda: allreduce(np.arange(5, dtype=np.int32), op="avg" if rank == 0 else "sum"), "rank 0", "avg")
# Non-contiguous input is fine out of place (it is copied), and the result is right.
y = allreduce(np.arange(20, dtype=np.float64)[::2])
assert np.array_equal(y, np.arange(20, dtype=np.float64)[::2] * comm.size)
comm.Barrier()
if rank == 0:
    print("bad_input OK")
