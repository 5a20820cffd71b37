"""MPI worker: every collective vs a float64 NumPy reference; exits non-zero on any failure.

usage: ring_check.py COUNTS DTYPES OPS   (comma-separated lists)
"""
import hashlib
import sys

import numpy as np
from mpi4py import MPI

from ringlab import allgather, allreduce, chunk_bounds, reduce_scatter
from ringlab.ops import bfloat16

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank
EPS = {"float16": 2 ** -11, "bfloat16": 2 ** -8, "float32": 2 ** -24, "float64": 2 ** -53}


def make(r, count, dtype, op):
    rng = np.random.default_rng([r, count, len(dtype), len(op)])
    if dtype.startswith("int"):
        v = rng.integers(-2, 3, count) if op == "prod" else rng.integers(-1000, 1000, count)
    elif op == "prod":
        v = rng.uniform(0.5, 1.5, count)
    else:
        v = rng.standard_normal(count)
    return v.astype(bfloat16 if dtype == "bfloat16" else dtype)


def reference(inputs, op):
    st = np.stack([a.astype(np.float64) for a in inputs]) if inputs[0].size else np.zeros((len(inputs), 0))
    ref = {"sum": st.sum(0), "avg": st.mean(0), "prod": st.prod(0), "max": st.max(0), "min": st.min(0)}[op]
    scale = np.abs(st).sum(0) / (n if op == "avg" else 1) if op in ("sum", "avg") else np.abs(ref)
    return ref, np.maximum(scale, 1e-300)


def check(name, got, ref, scale, dtype, op):
    tol = 0.0 if (op in ("max", "min") or dtype.startswith("int")) else (n + 1) * EPS[dtype] * 1.1
    err = np.abs(got.astype(np.float64) - ref) / scale
    bad = int(np.count_nonzero(~(err <= tol)))
    if bad:
        raise AssertionError(f"rank {rank}: {name} {dtype} {op} count={ref.size}: {bad} wrong, max err {err.max():.3g} > tol {tol:.3g}")


def identical(name, arr):
    digests = comm.allgather(hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest())
    if len(set(digests)) != 1:
        raise AssertionError(f"{name}: ranks differ bitwise")


counts = [int(c) for c in sys.argv[1].split(",")]
dtypes = sys.argv[2].split(",")
ops = sys.argv[3].split(",")
checked = 0
for count in counts:
    for dtype in dtypes:
        for op in ops:
            if op == "avg" and dtype.startswith("int"):
                continue
            inputs = [make(r, count, dtype, op) for r in range(n)]
            ref, scale = reference(inputs, op)
            x = inputs[rank].copy()
            before = x.copy()
            y = allreduce(x, op=op)                       # out of place
            assert np.array_equal(x.view(np.uint8), before.view(np.uint8)), "input modified"
            check("allreduce", y, ref, scale, dtype, op)
            identical("allreduce", y)
            allreduce(x, out=x, op=op)                    # in place
            assert np.array_equal(x.view(np.uint8), y.view(np.uint8)), "in-place differs from out-of-place"
            x2d = inputs[rank].reshape(1, -1) if count else inputs[rank]
            assert allreduce(x2d, op=op).shape == x2d.shape
            lo, hi = chunk_bounds(count, n)[rank]
            rs = reduce_scatter(inputs[rank], op=op)
            check("reduce_scatter", rs, ref[lo:hi], scale[lo:hi], dtype, op)
            ag = allgather(rs if count % n == 0 else inputs[rank])
            if count % n == 0:  # equal chunks: RS + AG reassembles the all-reduce exactly
                assert np.array_equal(ag.reshape(-1).view(np.uint8), y.view(np.uint8)), "RS+AG != allreduce"
            else:
                for r in range(n):
                    assert np.array_equal(ag[r].view(np.uint8), inputs[r].view(np.uint8)), "allgather wrong"
            checked += 1
comm.Barrier()
if rank == 0:
    print(f"ring_check OK: N={n} cases={checked}")
