"""The chunked row-parallel matmul pipeline equals the unsplit float64 X @ W for every k."""
from mpi4py import MPI

import numpy as np

from ringlab.teach.overlap import RowParallelMatmul, row_parallel_operands, row_parallel_reference

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank

for m, k_local, n_cols in ((37, 5, 11), (8, 16, 3), (3, 2, 4)):
    ref = row_parallel_reference(m, k_local, n_cols, n)
    x, w = row_parallel_operands(m, k_local, n_cols, rank)
    for chunks in (1, 2, 3, 4, 8):
        tp = RowParallelMatmul(x, w, chunks)
        assert len(tp.rows) == min(chunks, m)
        y = tp.overlapped(timeout=60)
        assert np.array_equal(y, ref), f"rank {rank}: m={m} k={chunks}: pipeline != unsplit reference"
        tp.out[...] = 0
        tp.compute()
        assert np.array_equal(tp.communicate(timeout=60), ref), f"rank {rank}: compute+communicate m={m} k={chunks}"
try:
    RowParallelMatmul(x, w, 0)
    raise AssertionError("chunks=0 accepted")
except ValueError as exc:
    assert "chunks" in str(exc)
print(f"rank {rank}: row-parallel pipeline OK", flush=True)
