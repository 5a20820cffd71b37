"""Worker: every host all-reduce algorithm vs a float64 reference, every op, odd counts; ranks bitwise identical.

    mpirun -n K python tests/mpi/alg_check.py [algo,algo,...] [dtype,dtype,...]
"""
import hashlib
import sys

import numpy as np
from mpi4py import MPI

import ringlab
from ringlab.ops import OPS, bfloat16

COUNTS = (0, 1, 3, 7, 13, 1001)


def inputs(rank, count, dtype, op):
    rng = np.random.default_rng(1000 * rank + 7 * count + 1)
    if np.dtype(dtype).kind == "i":
        hi = 2 if op == "prod" else 1000
        return rng.integers(-hi, hi + 1, count).astype(dtype)
    if op == "prod":
        return rng.uniform(0.5, 1.5, count).astype(dtype)
    return rng.standard_normal(count).astype(dtype)


def reference(n, count, dtype, op):
    """float64 result and the scale errors are measured against (sum |x_k| for sums)."""
    stack = np.stack([inputs(k, count, dtype, op).astype(np.float64) for k in range(n)])
    ref = {"sum": stack.sum(0), "avg": stack.mean(0), "prod": stack.prod(0),
           "max": stack.max(0), "min": stack.min(0)}[op]
    scale = np.abs(stack).sum(0) / (n if op == "avg" else 1) if op in ("sum", "avg") else np.abs(ref)
    return ref, np.maximum(scale, np.finfo(np.float64).tiny)


def tolerance(dtype, op, n):
    """N-1 roundings of partial results + one for the division + one for storage; exact for max/min/ints."""
    if op in ("max", "min") or np.dtype(dtype).kind == "i":
        return 0.0
    eps = {"float16": 2 ** -11, "bfloat16": 2 ** -8, "float32": 2 ** -24, "float64": 2 ** -53}[np.dtype(dtype).name]
    return (n + 2) * eps * (1.1 if op == "prod" else 1.01)


def main():
    comm = MPI.COMM_WORLD
    n, r = comm.size, comm.rank
    algos = sys.argv[1].split(",") if len(sys.argv) > 1 and sys.argv[1] else \
        ["ring", "recursive_doubling", "rabenseifner", "ring_bidir", "direct", "hierarchical", "auto"]
    dtypes = sys.argv[2].split(",") if len(sys.argv) > 2 else ["float32", "float64", "int64"]
    dtypes = [bfloat16 if d == "bfloat16" else np.dtype(d) for d in dtypes]
    failures, checked = [], 0
    for algo in algos:
        for dtype in dtypes:
            for op in OPS:
                if op == "avg" and np.dtype(dtype).kind == "i":
                    continue
                for count in COUNTS:
                    x = inputs(r, count, dtype, op)
                    keep = x.copy()
                    y = ringlab.allreduce(x, op=op, algo=algo)
                    ref, scale = reference(n, count, dtype, op)
                    err = float(np.max(np.abs(y.astype(np.float64) - ref) / scale)) if count else 0.0
                    digests = comm.allgather(hashlib.sha256(y.tobytes()).hexdigest())
                    ok = err <= tolerance(dtype, op, n) and len(set(digests)) == 1 and np.array_equal(x, keep)
                    ok &= y.dtype == np.dtype(dtype) and y.shape == (count,)
                    if count == 13:   # in place must give the same bytes as out of place
                        z = x.copy()
                        ringlab.allreduce(z, out=z, op=op, algo=algo)
                        ok &= z.tobytes() == y.tobytes()
                    checked += 1
                    if not ok:
                        failures.append(f"{algo} {dtype} {op} count={count}: err {err:.2e} "
                                        f"identical={len(set(digests)) == 1}")
    failures = comm.allreduce(failures, op=MPI.SUM) if n > 1 else failures
    if r == 0:
        for f in sorted(set(failures)):
            print("FAIL", f)
        print(f"N={n}: {checked} cases over {', '.join(algos)}: {'OK' if not failures else 'FAILED'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
