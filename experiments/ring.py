"""Ring all-reduce: walkthrough, verification and benchmark against the MPI library's Allreduce.

    mpirun -n 8 python experiments/ring.py              # all three parts, default sizes
    mpirun -n 4 python experiments/ring.py --sizes 1M,64M --iters 20 --json out.json
"""
import argparse
import hashlib
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab import allreduce  # noqa: E402
from ringlab.arrays import gpu_available, use_local_gpu  # noqa: E402
from ringlab.bench.harness import check_dtype_op, format_table, measure, run_metadata, size_list_arg, write_json  # noqa: E402,E501
from ringlab.ops import OPS, SUPPORTED_DTYPES  # noqa: E402
from ringlab.gpu.device import select_transport  # noqa: E402
from ringlab.bench.variants import allreduce_variant, mpi_native_variant, nccl_variant  # noqa: E402
from ringlab.teach.walkthrough import format_walkthrough, record_ring_allreduce  # noqa: E402


def parse_args(argv=None):
    dtypes = sorted(np.dtype(d).name for d in SUPPORTED_DTYPES)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size_list_arg, default="4K,1M,16M", help="comma-separated message sizes in bytes (K/M/G suffixes); default %(default)s")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per size (median reported); default %(default)s")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first; default %(default)s")
    p.add_argument("--dtype", default="float32", choices=dtypes, help="element type; default %(default)s")
    p.add_argument("--op", default="sum", choices=OPS, help="reduction; default %(default)s")
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"],
                   help="buffers: cupy if a GPU is usable (auto), else numpy; default %(default)s")
    p.add_argument("--walkthrough-ranks", type=int, default=8,
                   help="print the step tables only when N <= this (they grow as N^2); default %(default)s")
    p.add_argument("--no-walkthrough", action="store_true", help="skip part 1")
    p.add_argument("--figures", metavar="DIR", help="also draw the walkthrough: one PNG per step and a GIF (N <= 8)")
    p.add_argument("--no-bench", action="store_true", help="skip part 3")
    p.add_argument("--json", metavar="PATH", help="write the benchmark rows and run metadata as JSON")
    p.add_argument("--quiet", action="store_true", help="print only the verification line and the table")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0:
        p.error("--iters must be >= 1 and --warmup >= 0")
    check_dtype_op(p, args.dtype, args.op)
    return args


def verify(comm, dtype, xp, count=100_003):
    """All-reduce random data for every op; compare with a float64 NumPy reference built from every
    rank's input, and check that all ranks hold bitwise-identical results."""
    n, r = comm.size, comm.rank
    results = []
    for op in OPS:
        if op == "avg" and np.dtype(dtype).kind == "i":
            continue
        inputs = [_random_input(k, count, dtype, op) for k in range(n)]
        ref, scale = _reduce64(inputs, op)
        x = xp.asarray(inputs[r]) if xp is not np else inputs[r]
        y = allreduce(x, op=op, comm=comm)
        host = y.get() if xp is not np else y
        err = float(np.max(np.abs(host.astype(np.float64) - ref) / scale)) if count else 0.0
        same = len(set(comm.allgather(hashlib.sha256(host.tobytes()).hexdigest()))) == 1
        tol = _tolerance(dtype, op, n)
        results.append((op, err, tol, same, err <= tol and same))
    return results


def _random_input(rank, count, dtype, op):
    rng = np.random.default_rng(1234 + rank)
    if np.dtype(dtype).kind == "i":
        hi = 3 if op == "prod" else 1000
        return rng.integers(-hi, hi + 1, count).astype(dtype)
    if op == "prod":
        return rng.uniform(0.5, 1.5, count).astype(dtype)
    return rng.standard_normal(count).astype(dtype)


def _reduce64(inputs, op):
    """float64 reference and the scale its error is measured against: sum(|x_k|) for sums (the
    classic summation bound, immune to cancellation), |result| for the rest."""
    stack = np.stack([a.astype(np.float64) for a in inputs])
    ref = {"sum": stack.sum(0), "avg": stack.mean(0), "prod": stack.prod(0),
           "max": stack.max(0), "min": stack.min(0)}[op]
    if op in ("sum", "avg"):
        scale = np.abs(stack).sum(0) / (len(inputs) if op == "avg" else 1)
    else:
        scale = np.abs(ref)
    return ref, np.maximum(scale, np.finfo(np.float64).tiny)


def _tolerance(dtype, op, n):
    """Bound on |result - ref| / scale: N-1 roundings of the running value, one more for avg's division
    and one for storing the result; exact for max/min and integers."""
    eps = {"float16": 2 ** -11, "bfloat16": 2 ** -8, "float32": 2 ** -24, "float64": 2 ** -53}.get(dtype, 0.0)
    if op in ("max", "min"):
        return 0.0
    return (n + 1) * eps * (1.01 if op != "prod" else 1.1)


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    n, rank = comm.size, comm.rank
    say = print if rank == 0 else (lambda *a, **k: None)
    device = args.backend == "cupy" or (args.backend == "auto" and gpu_available())
    if device:
        gpu = use_local_gpu(comm)
        import cupy as xp
        name, slices, why = select_transport(comm)
        where = f"CuPy device buffers (rank 0 on GPU {gpu}), transport: {name} ({why})"
    else:
        xp = np
        where = "NumPy host buffers"
    say(f"ringlab ring all-reduce: N = {n} ranks, {where}, MPI: {MPI.Get_library_version().splitlines()[0].strip()}")

    if not args.no_walkthrough and not args.quiet:
        records, final = record_ring_allreduce(comm)
        if rank == 0:
            if n <= args.walkthrough_ranks:
                print("\n== 1. walkthrough (a real run on 2**rank data) ==")
                print(format_walkthrough(records))
            else:
                print(f"\n== 1. walkthrough skipped: N = {n} > --walkthrough-ranks {args.walkthrough_ranks} ==")
        if args.figures and rank == 0:
            from ringlab.teach.walkthrough_figures import render_walkthrough_figures
            try:
                paths = render_walkthrough_figures(records, args.figures)
                print(f"wrote {len(paths)} walkthrough figures to {args.figures}")
            except ValueError as exc:
                print(f"figures skipped: {exc}")
        ok = bool(np.all(final == (1 << n) - 1))
        say(f"walkthrough result: every element = 2**N - 1 = {(1 << n) - 1}: {'yes' if ok else 'NO'}")

    say(f"\n== 2. verification against a float64 NumPy reference ({args.dtype}, 100003 elements) ==")
    results = verify(comm, args.dtype, xp)
    for op, err, tol, same, ok in results:
        say(f"  {op:>5s}: max rel err {err:9.2e} (tol {tol:8.1e}), ranks bitwise identical: {same}  -> {'PASS' if ok else 'FAIL'}")
    failed = [op for op, *_, ok in results if not ok]

    if not args.no_bench:
        itemsize = np.dtype(args.dtype).itemsize if args.dtype != "bfloat16" else 2
        counts = [s // itemsize for s in args.sizes]
        variants = [allreduce_variant(comm, "ring", device=device), mpi_native_variant(comm, device=device)]
        if device:  # the host-staged ring and NCCL beside the fastest transport
            variants[1:1] = [allreduce_variant(comm, "ring-staged", device=True, transport="staged")]
            variants.append(nccl_variant(comm))
        say(f"\n== 3. benchmark: ring vs the MPI library's Allreduce ({args.iters} iters, median of the slowest rank) ==")
        rows = measure(comm, variants, counts, args.dtype, args.op, iters=args.iters, warmup=args.warmup,
                       baseline="mpi-native", progress=None if args.quiet else (lambda t: print("  ..", t, flush=True)))
        say(format_table(rows, f"allreduce, N = {n}, ratio = mpi-native time / variant time (> 1: faster than MPI)"))
        if args.json and rank == 0:
            write_json(args.json, rows, run_metadata(comm, backend="cupy" if device else "numpy"))
            print(f"wrote {args.json}")
        if any(r.wrong > 0 for r in rows):
            failed.append("benchmark #wrong")
    if failed:
        say(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
