"""Device check: numba-CUDA kernels vs the NumPy references on a real GPU, then their speed.

    python experiments/device_kernels_check.py                  # kernels: PASS/FAIL lines + speed table
    mpirun -n 4 python experiments/device_kernels_check.py      # + FP8 all-reduce on CuPy == NumPy path

1. every reduce kernel (sum/prod/max/min x fp32/fp16/bf16/fp64/int32/int64) and every FP8 kernel
   (quantize, dequantize, fused hop, accumulate; e4m3/e5m2; blocks 32..256; fp32/fp16/bf16) is
   compared bit for bit with kernels/reference.py on ~1M elements with NaN/inf/zero blocks.
2. with N > 1 ranks: allreduce_fp8 on CuPy buffers (kernels + host staging) must equal the NumPy
   path bit for bit on every rank (same arithmetic, so the same bytes).
3. rank 0: kernel GB/s at --size (default 256 MB) vs a device copy; torch casts as peers. Every launch
   variant of kernels/fp8.py VARIANTS is checked bit for bit at that size and timed; the summary names
   the fastest per kernel (set it as kernels.fp8.TUNING) against the goals (>= 90% of the copy,
   quantize >= 2.5x torch scale+cast).
Exit status 1 if anything FAILs.
"""
import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ringlab.kernels  # noqa: E402  (restores np.row_stack for numba-cuda on NumPy 2.5)
from ringlab import allreduce_fp8  # noqa: E402
from ringlab.arrays import gpu_available, use_local_gpu  # noqa: E402
from ringlab.bench.harness import format_table, measure  # noqa: E402
from ringlab.bench.harness import parse_size, run_metadata, write_json  # noqa: E402


def _bits(a):
    return a.view(np.uint16) if str(a.dtype) == "bfloat16" else a


def _same(got, want):
    """Bitwise equal, except that any NaN matches any NaN (GPUs write the canonical NaN)."""
    g, w = np.asarray(got), np.asarray(want)
    if w.dtype.kind == "f" or str(w.dtype) == "bfloat16":
        g32, w32 = g.astype(np.float32), w.astype(np.float32)
        nan = np.isnan(w32)
        return bool(np.array_equal(np.isnan(g32), nan) and np.array_equal(g32[~nan].view(np.uint32),
                                                                            w32[~nan].view(np.uint32)))
    return bool(np.array_equal(g.view(np.uint8), w.view(np.uint8)))


def check_kernels(n, report, quick=False):
    import cupy
    from ml_dtypes import bfloat16

    from ringlab.kernels.fp8 import dequant_accumulate_device, dequant_add_requant_device, dequantize_device, quantize_device
    from ringlab.kernels.reduce import reduce_device
    from ringlab.kernels.reference import (dequant_accumulate_reference, dequant_add_requant_reference,
                                   dequantize_fp8_blockwise, quantize_fp8_blockwise, reduce_reference)
    rng = np.random.default_rng(0)
    dev = lambda a: cupy.asarray(_bits(a))  # noqa: E731
    host = lambda d, like: cupy.asnumpy(d).view(like.dtype)  # noqa: E731
    for dt in (np.float32, bfloat16) if quick else (np.float32, np.float16, bfloat16, np.float64, np.int32, np.int64):
        for op in ("sum",) if quick else ("sum", "prod", "max", "min"):
            if np.dtype(dt).kind == "i":
                a, b = (rng.integers(-2 ** 30, 2 ** 30, n).astype(dt) for _ in range(2))
            else:
                a, b = ((rng.standard_normal(n) * 4).astype(dt) for _ in range(2))
            want = reduce_reference(a, b, op)
            for m, label in ((n, "packed/even"), (n - 1, "odd")):
                got = host(reduce_device(dev(a[:m]), dev(b[:m]), op), want)
                report(f"reduce {op:>4s} {np.dtype(dt).name:>8s} n={m} ({label})", _same(got, want[:m]))
    for fmt in ("e4m3", "e5m2"):
        for block in (32, 128) if quick else ringlab.kernels.BLOCK_SIZES:
            for dt in (np.float32, bfloat16) if quick else (np.float32, np.float16, bfloat16):
                x = (rng.standard_t(2, n) * 2.0 ** rng.integers(-10, 10, n)).astype(np.float32)
                x[[5, 77, 1000]] = [np.nan, np.inf, -np.inf]
                x[2 * block: 3 * block] = 0
                x = x.astype(dt)
                tag = f"{fmt} block {block:>3d} {np.dtype(dt).name:>8s}"
                wc, ws = quantize_fp8_blockwise(x, fmt, block)
                c, s = cupy.empty(n, np.uint8), cupy.empty(ws.size, np.float32)
                quantize_device(dev(x), c, s, fmt, block)
                report(f"quantize    {tag}", _same(cupy.asnumpy(c), wc) and _same(cupy.asnumpy(s), ws))
                out = cupy.empty(n, np.uint16 if dt is bfloat16 else dt)
                dequantize_device(c, s, out, fmt, block)
                report(f"dequantize  {tag}", _same(host(out, x), dequantize_fp8_blockwise(wc, ws, fmt, block, dtype=dt)))
                loc = (rng.standard_normal(n) * 100).astype(dt)
                want_out = np.empty(n, dt)
                hc, hs = dequant_add_requant_reference(loc, wc, ws, fmt, block, divide_by=3, out=want_out)
                nc, ns, o = cupy.empty_like(c), cupy.empty_like(s), cupy.empty(n, np.uint16 if dt is bfloat16 else dt)
                dequant_add_requant_device(dev(loc), c, s, nc, ns, fmt, block, out=o, divide_by=3)
                report(f"hop (fused) {tag}", _same(cupy.asnumpy(nc), hc) and _same(cupy.asnumpy(ns), hs)
                       and _same(host(o, x), want_out))
                if dt is np.float32:
                    check_misaligned(fmt, block, x, wc, ws, report, tag)
                    acc = rng.standard_normal(n).astype(np.float32)
                    d_acc = cupy.asarray(acc)
                    dequant_accumulate_device(d_acc, c, s, fmt, block)
                    report(f"accumulate  {tag}", _same(cupy.asnumpy(d_acc),
                                                       dequant_accumulate_reference(acc, wc, ws, fmt, block)))


def check_misaligned(fmt, block, x, wc, ws, report, tag):
    """Chunks at an odd element offset (element-wise path), an odd count, signed NaN peer codes, divide_by 2^k."""
    import cupy

    from ringlab.kernels.fp8 import dequant_add_requant_device, quantize_device
    from ringlab.kernels.reference import dequant_add_requant_reference, quantize_fp8_blockwise
    m = x.size - 3
    dx = cupy.asarray(x)[1: 1 + m]
    want_c, want_s = quantize_fp8_blockwise(x[1: 1 + m], fmt, block)
    c, s = cupy.empty(m, np.uint8), cupy.empty(want_s.size, np.float32)
    quantize_device(dx, c, s, fmt, block)
    report(f"quantize    {tag} offset 1, n odd", _same(cupy.asnumpy(c), want_c) and _same(cupy.asnumpy(s), want_s))
    peer = want_c.copy()
    peer[::97] = 0xFF                                  # signed NaN codes: results must use the one NaN code
    for divide_by in (4, 3):
        want_out = np.empty(m, np.float32)
        hc, hs = dequant_add_requant_reference(x[1: 1 + m], peer, want_s, fmt, block, divide_by, out=want_out)
        nc, ns, o = cupy.empty(m, np.uint8), cupy.empty(hs.size, np.float32), cupy.empty(m + 1, np.float32)[1:]
        dequant_add_requant_device(dx, cupy.asarray(peer), cupy.asarray(want_s), nc, ns, fmt, block, out=o,
                                   divide_by=divide_by)
        report(f"hop (fused) {tag} offset 1, n odd, NaN peers, /{divide_by}",
               _same(cupy.asnumpy(nc), hc) and _same(cupy.asnumpy(ns), hs) and _same(cupy.asnumpy(o), want_out))


def check_allreduce(comm, report):
    """allreduce_fp8 on CuPy buffers, every device transport, equals the NumPy (MPI) path bit for bit."""
    import cupy
    cases = [(algo, tr) for algo, trs in (("ring", ("ipc", "staged")), ("direct", ("staged",))) for tr in trs]
    for algo, tr in cases:
        for fmt, op in (("e4m3", "sum"), ("e5m2", "avg")):
            for dt in (np.float32, np.float16):
                for count in (100_003, 1_000_003, 7):        # growing, then shrinking: IPC slots are reused
                    x = (np.random.default_rng([comm.rank, count]).standard_normal(count) * 10).astype(dt)
                    want = allreduce_fp8(x, fmt=fmt, algo=algo, op=op, comm=comm)
                    d = cupy.asarray(x)
                    got = cupy.asnumpy(allreduce_fp8(d, fmt=fmt, algo=algo, op=op, comm=comm, transport=tr))
                    allreduce_fp8(d, out=d, fmt=fmt, algo=algo, op=op, comm=comm, transport=tr)   # in place
                    ok = _same(got, want) and _same(cupy.asnumpy(d), want)
                    ok = comm.allreduce(int(ok), op=MPI.MIN) == 1
                    report(f"allreduce_fp8 CuPy == NumPy: {algo:>6s} via {tr:>6s} {fmt} {op} "
                           f"{np.dtype(dt).name} n={count} N={comm.size} (+ in place)", ok)


def _device_name():
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


def summarize_speed(rows, failures):
    """Each row as a share of the device copy; the best launch variant per kernel against the goals."""
    copy = next(r.algbw for r in rows if r.variant == "device copy")
    for r in rows:
        if not r.note:
            print(f"  {r.variant:>26s}: {r.algbw:8.1f} GB/s = {r.algbw / copy:6.1%} of the device copy")
        if not r.note and r.wrong != 0:
            failures.append(f"speed check {r.variant}: #wrong {r.wrong}")
    bw = {r.variant: r.algbw for r in rows if not r.note}
    torch_scaled = bw.get("torch scale+cast")
    print("\n# best launch variant per kernel (goal: >= 90% of the device copy)")
    for kernel in ("quantize", "dequantize", "hop", "accumulate"):
        mine = {v: b for v, b in bw.items() if v.startswith(kernel + " ") and "(one call)" not in v}
        if not mine:
            continue
        best = max(mine, key=mine.get)
        line = f"  {kernel:>10s}: {best:>26s} {mine[best]:8.1f} GB/s = {mine[best] / copy:6.1%} of copy"
        if kernel == "quantize" and torch_scaled:
            line += f", {mine[best] / torch_scaled:4.2f}x torch scale+cast (goal >= 2.5x)"
        print(line)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=(1 << 20) + 2, help="elements per correctness check")
    p.add_argument("--size", default="256M", help="fp32 input bytes for the speed table")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-check", action="store_true", help="skip the bit-exactness sweep (the speed rows still check)")
    p.add_argument("--quick", action="store_true", help="sweep only sum, blocks 32/128, fp32/bf16 (fewer compiles)")
    p.add_argument("--json", help="write the speed rows here")
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    if not gpu_available():
        say("FAIL: no usable GPU (CuPy + CUDA device) on this machine")
        return 1
    use_local_gpu(comm)
    failures = []

    def report(name, ok):
        if not ok:
            failures.append(name)
        say(f"{'PASS' if ok else 'FAIL'}  {name}", flush=True)
    if comm.rank == 0 and not args.no_check:
        check_kernels(args.n, report, args.quick)
    comm.Barrier()
    if comm.size > 1:
        check_allreduce(comm, report)
    if not args.no_speed and comm.rank == 0:
        from ringlab.bench.kernel_speed import kernel_speed_variants
        count = parse_size(args.size) // 4
        rows = measure(MPI.COMM_SELF, kernel_speed_variants(), [count], "float32", "sum", iters=args.iters, warmup=3)
        print(format_table(rows, f"kernel speed, {count} elements; GB/s = (bytes read + written) / time"))
        summarize_speed(rows, failures)
        if args.json:
            write_json(args.json, rows, run_metadata(MPI.COMM_SELF, device=_device_name(),
                                                   timing="device time of 10 queued launches (bench.Case.queued)"))
    comm.Barrier()
    failures = comm.allreduce(failures)
    say(f"\n{'ALL PASS' if not failures else 'FAILED: ' + '; '.join(sorted(set(failures)))}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
