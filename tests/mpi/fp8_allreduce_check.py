"""MPI worker: FP8 all-reduce (ring and direct) vs a one-process simulation and a float64 bound.

Checks, for every combination: the result equals, bit for bit, a sequential simulation of the
algorithm built from the NumPy reference quantizer (schedule independent of collectives/); it is
within fp8_allreduce_error_bound of the exact float64 sum; all ranks hold identical bytes; in-place
works; inf/NaN follow the policy; bad input raises the same error on every rank. Prints "OK <n>".
"""
import hashlib
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ml_dtypes import bfloat16  # noqa: E402

from ringlab import InvalidCollectiveCall, allreduce, allreduce_fp8, chunk_bounds  # noqa: E402
from ringlab.fp8 import fp8_allreduce_error_bound  # noqa: E402
from ringlab.kernels.reference import dequantize_fp8_blockwise, quantize_fp8_blockwise  # noqa: E402

comm = MPI.COMM_WORLD
N, R = comm.size, comm.rank
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": bfloat16}


def make_input(rank, count, dtype, seed):
    """Rank ``rank``'s input: normal values with per-block magnitudes from 1e-3 to 1e3, one zero block."""
    rng = np.random.default_rng(seed * 1000 + rank)
    mag = 10.0 ** rng.uniform(-3, 3, size=-(-count // 64)).repeat(64)[:count]
    x = rng.standard_normal(count) * mag
    x[64:128] = 0.0
    return x.astype(DTYPES[dtype])


def qd(v, fmt, block):
    """D(Q(v)) in fp32: what one quantize + dequantize round trip gives."""
    c, s = quantize_fp8_blockwise(v, fmt, block)
    return dequantize_fp8_blockwise(c, s, fmt, block)


def simulate(inputs, fmt, block, algo, op, dtype):
    """The algorithm's arithmetic, chunk by chunk, in one process (rotate 0 ring; chunk c owned by c for direct)."""
    n, count = len(inputs), inputs[0].size
    if n == 1:                                   # one rank: nothing travels, nothing is quantized
        return inputs[0].copy()
    out = np.empty(count, np.float32)
    for c, (lo, hi) in enumerate(chunk_bounds(count, n)):
        part = [x[lo:hi].astype(np.float32) for x in inputs]
        if algo == "ring":                      # chunk c starts at rank c, collects c+1, ..., c+N-1
            q = qd(part[c], fmt, block)
            for k in range(1, n):
                s = part[(c + k) % n] + q
                if k == n - 1 and op == "avg":
                    s = s / np.float32(n)
                q = qd(s, fmt, block)
        else:                                    # owner c adds every other rank's singly-quantized copy
            acc = part[c].copy()
            for k in range(1, n):
                acc += qd(part[(c - k) % n], fmt, block)
            if op == "avg":
                acc /= np.float32(n)
            q = qd(acc, fmt, block)
        out[lo:hi] = q
    return out.astype(inputs[0].dtype)


def digest(a):
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8).tobytes()).hexdigest()


def check_case(count, dtype, fmt, block, algo, op, seed, inplace=False):
    inputs = [make_input(k, count, dtype, seed) for k in range(N)]
    x = inputs[R].copy()
    y = allreduce_fp8(x, out=x if inplace else None, fmt=fmt, block=block, algo=algo, op=op, comm=comm)
    tag = f"N={N} count={count} {dtype} {fmt} block={block} {algo} {op} inplace={inplace}"
    assert y.dtype == x.dtype and y.shape == x.shape, tag
    if not inplace:
        assert np.array_equal(x.view(np.uint8), inputs[R].view(np.uint8)), f"input modified: {tag}"
    sim = simulate(inputs, fmt, block, algo, op, dtype)
    assert np.array_equal(y.view(np.uint8), sim.view(np.uint8)), \
        f"differs from the simulation at {np.flatnonzero(y.view(np.uint8) != sim.view(np.uint8))[:5]}: {tag}"
    assert len(set(comm.allgather(digest(y)))) == 1, f"ranks differ: {tag}"
    exact = np.sum([v.astype(np.float64) for v in inputs], axis=0) / (N if op == "avg" else 1)
    if count:
        bound = fp8_allreduce_error_bound(fmt, N, max(float(np.abs(v.astype(np.float64)).max()) for v in inputs),
                                          algo, op)
        # + the output dtype's own rounding (half an ulp: 2**-11 fp16, 2**-9 bf16) of |result|
        out_ulp = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -9}[dtype]
        err = np.abs(y.astype(np.float64) - exact)
        assert (err <= bound + out_ulp * np.abs(exact)).all(), f"error {err.max():.3g} > bound {bound:.3g}: {tag}"
    return 1


def check_nonfinite(fmt, algo):
    """NaN stays NaN everywhere; +inf stays +inf in E5M2 and becomes NaN in E4M3fn; other elements finite."""
    count = 300
    x = np.ones(count, np.float32)
    if R == 0:
        x[3] = np.nan
    if R == N - 1:
        x[250] = np.inf
    y = allreduce_fp8(x, fmt=fmt, algo=algo, comm=comm)
    if N == 1:                  # nothing travels: the input comes back exactly
        assert np.array_equal(y, x, equal_nan=True), (fmt, algo)
        return 1
    assert np.isnan(y[3]), (fmt, algo, y[3])
    assert (y[250] == np.inf) if fmt == "e5m2" else np.isnan(y[250]), (fmt, algo, y[250])
    rest = np.delete(y, [3, 250])
    assert np.isfinite(rest).all() and np.allclose(rest, N, rtol=2 ** -3), (fmt, algo)
    return 1


def expect_error(fn, words):
    try:
        fn()
    except (InvalidCollectiveCall, TypeError, ValueError) as exc:
        assert all(w in str(exc) for w in words), str(exc)
        return 1
    raise AssertionError(f"no error raised; expected one mentioning {words}")


def main():
    quick = "--quick" in sys.argv
    if "--small-pieces" in sys.argv:     # the host codec's pieces (kernels/codec.py) far below the chunk sizes
        from ringlab.kernels import codec
        codec.PIECE_BLOCKS = 2
    if "--small-passes" in sys.argv:     # chunks cut into several passes of block-aligned parts (collectives/fp8.py)
        from ringlab import fp8
        fp8.MESSAGE_BUDGET = 0.01
    counts = [0, 1, N + 1, 1000] if quick else [0, 1, N - 1, 1000, 4099]
    done = 0
    for count in counts:
        for algo in ("ring", "direct"):
            for fmt in ("e4m3", "e5m2"):
                done += check_case(count, "float32", fmt, 32 if count % 2 else 128, algo, "sum", seed=count)
    for dtype in ("bfloat16", "float16"):
        for algo in ("ring", "direct"):
            done += check_case(1001, dtype, "e4m3", 64, algo, "avg", seed=5)
    done += check_case(777, "float32", "e5m2", 256, "ring", "avg", seed=6, inplace=True)
    done += check_case(777, "float32", "e4m3", 32, "direct", "sum", seed=7, inplace=True)
    for fmt in ("e4m3", "e5m2"):
        for algo in ("ring", "direct"):
            done += check_nonfinite(fmt, algo)
    done += expect_error(lambda: allreduce_fp8(np.arange(10, dtype=np.int32), comm=comm), ["int32", "integers"])
    done += expect_error(lambda: allreduce_fp8(np.ones(10, np.float32), op="max", comm=comm), ["max"])
    done += expect_error(lambda: allreduce_fp8(np.ones(10, np.float32), fmt="e3m4", comm=comm), ["e3m4"])
    done += expect_error(lambda: allreduce_fp8(np.ones(10, np.float32), block=100, comm=comm), ["block"])
    done += expect_error(lambda: allreduce_fp8(np.ones(10, np.float32), transport="nvlink", comm=comm),
                         ["nvlink", "ipc", "staged"])
    done += expect_error(lambda: allreduce_fp8(np.ones(10, np.float32), transport="ipc", comm=comm),
                         ["CuPy", "NumPy"])
    if N > 1:   # ranks disagreeing on the format: the same clear error on every rank, no hang
        done += expect_error(lambda: allreduce_fp8(np.ones(10, np.float32), fmt="e4m3" if R else "e5m2", comm=comm),
                             ["differs"])
    # the registered names reach the same code through the generic API
    x = make_input(R, 999, "float32", 9)
    y = allreduce(x, algo="fp8-direct", comm=comm)
    z = allreduce_fp8(x, algo="direct", comm=comm)
    assert np.array_equal(y, z)
    done += 1
    comm.Barrier()
    if R == 0:
        print(f"OK {done} checks on {N} ranks")


if __name__ == "__main__":
    main()
