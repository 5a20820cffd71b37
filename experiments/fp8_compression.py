"""FP8-compressed all-reduce: accuracy vs N, collective speed, and (on a GPU) kernel speed.

    mpirun -n 8 python experiments/fp8_compression.py                      # CPU, NumPy path, < 2 min
    mpirun -n 16 python experiments/fp8_compression.py --plot docs/img/fp8_error_vs_n.png --json out.json
    python experiments/fp8_compression.py --no-accuracy --no-speed          # GPU: kernel GB/s at 256 MB

1. accuracy: relative L2 error vs a float64 reference, for N = 2, 4, 8, 16 (sub-communicators up to
   the run's size) and the run's N; formats e4m3/e5m2, blocks 32/128, normal and Student-t(df=2)
   data; ring (re-quantizes every hop: grows with N) vs direct (qgZ: does not), bf16 ring beside.
2. collective speed: FP8 ring/direct vs the fp32 and bf16 rings on the same transport; algbw counts
   the uncompressed fp32 bytes (4 B per element) for every row, so times compare directly.
3. kernel speed (GPU only): each kernel's GB/s (bytes read + written) vs a device copy, torch peers.
"""
import argparse
import json
import math
import os
import sys
from dataclasses import asdict

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab import allreduce, allreduce_fp8  # noqa: E402
from ringlab.arrays import gpu_available  # noqa: E402
from ringlab.bench.harness import format_table, measure, parse_size, run_metadata, size_list_arg  # noqa: E402
from ringlab.bench.variants import allreduce_variant, fp8_variant, mpi_native_variant, nccl_variant  # noqa: E402

DISTS = ("normal", "t2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=1 << 16, help="elements per rank for accuracy; default %(default)s")
    p.add_argument("--ns", default="2,4,8,16", help="sub-communicator sizes (those <= N run, plus N); default %(default)s")
    p.add_argument("--fmts", default="e4m3,e5m2")
    p.add_argument("--blocks", default="32,128")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", type=size_list_arg, default="1M,16M", help="collective speed: fp32 bytes per rank; default %(default)s")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--kernel-size", default="256M", help="GPU kernel speed: fp32 input bytes; default %(default)s")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy",
                   help="collective speed on host (NumPy) or device (CuPy) buffers; default %(default)s")
    p.add_argument("--transports", default="ipc,staged",
                   help="device transports for --backend cupy (ipc, mpi, staged); default %(default)s")
    p.add_argument("--no-accuracy", action="store_true")
    p.add_argument("--no-speed", action="store_true")
    p.add_argument("--no-kernels", action="store_true")
    p.add_argument("--json", metavar="PATH", help="write every table as JSON")
    p.add_argument("--plot", metavar="PNG", help="plot relative error vs N (ring vs direct)")
    a = p.parse_args(argv)
    a.ns = sorted({int(v) for v in a.ns.split(",") if v.strip()})
    a.fmts = [v.strip() for v in a.fmts.split(",") if v.strip()]
    a.blocks = [int(v) for v in a.blocks.split(",") if v.strip()]
    a.kernel_size = parse_size(a.kernel_size)
    a.transports = [v.strip() for v in a.transports.split(",") if v.strip()]
    bad = [t for t in a.transports if t not in ("ipc", "mpi", "staged")]
    if bad:
        p.error(f"unknown transport(s) {', '.join(bad)}; expected ipc, mpi or staged")
    return a


def make_input(rank, count, dist, seed):
    """Rank ``rank``'s fp32 gradient-like data: standard normal, or heavy-tailed Student-t with df=2."""
    rng = np.random.default_rng([seed, rank, DISTS.index(dist)])
    x = rng.standard_normal(count) if dist == "normal" else rng.standard_t(2, count)
    return x.astype(np.float32)


def relative_l2(got, exact):
    return float(np.linalg.norm(got.astype(np.float64) - exact) / max(np.linalg.norm(exact), 1e-300))


def accuracy(comm, args):
    """Rows {nranks, algo, fmt, block, dist, rel_l2}; complete on rank 0 (a member of every sub-communicator)."""
    rows = []
    for n in sorted({k for k in args.ns if 2 <= k <= comm.size} | ({comm.size} if comm.size > 1 else set())):
        sub = comm.Split(0 if comm.rank < n else MPI.UNDEFINED, comm.rank)
        if sub == MPI.COMM_NULL:
            continue
        for dist in DISTS:
            x = make_input(sub.rank, args.count, dist, args.seed)
            exact = None
            if sub.rank == 0:   # the reference is recomputed from every rank's seed, not communicated
                exact = np.sum([make_input(k, args.count, dist, args.seed).astype(np.float64) for k in range(n)], 0)
            for fmt in args.fmts:
                for block in args.blocks:
                    for algo in ("ring", "direct"):
                        y = allreduce_fp8(x, fmt=fmt, block=block, algo=algo, comm=sub)
                        if sub.rank == 0:
                            rows.append(dict(nranks=n, algo=algo, fmt=fmt, block=block, dist=dist,
                                             rel_l2=relative_l2(y, exact)))
            from ml_dtypes import bfloat16
            y = allreduce(x.astype(bfloat16), comm=sub)
            if sub.rank == 0:
                rows.append(dict(nranks=n, algo="bf16 ring", fmt="-", block=0, dist=dist, rel_l2=relative_l2(y, exact)))
        sub.Free()
    return rows


def format_accuracy(rows):
    ns = sorted({r["nranks"] for r in rows})
    head = f"# {'fmt':>5s} {'block':>5s} {'data':>6s} {'algo':>9s} " + " ".join(f"{'N=' + str(n):>9s}" for n in ns)
    lines = ["# relative L2 error vs float64 reference (lower is better)", head]
    keys = sorted({(r["fmt"], r["block"], r["dist"], r["algo"]) for r in rows},
                  key=lambda k: (k[0] == "-", k[0], k[1], k[2], k[3]))
    for fmt, block, dist, algo in keys:
        by_n = {r["nranks"]: r["rel_l2"] for r in rows if (r["fmt"], r["block"], r["dist"], r["algo"]) == (fmt, block, dist, algo)}
        cells = " ".join(f"{by_n[n]:9.2e}" if n in by_n else f"{'-':>9s}" for n in ns)
        lines.append(f"  {fmt:>5s} {block or '-':>5} {dist:>6s} {algo:>9s} {cells}")
    return "\n".join(lines)


def collective_speed(comm, args, say):
    if args.backend == "cupy":
        return device_collective_speed(comm, args, say)
    variants = [allreduce_variant(comm, "fp32 ring"),
                allreduce_variant(comm, "bf16 ring", dtype="bfloat16", bytes_per_element=4),
                fp8_variant(comm, "ring"), fp8_variant(comm, "direct"), mpi_native_variant(comm, "mpi-native fp32")]
    rows = measure(comm, variants, [s // 4 for s in args.sizes], "float32", "sum", iters=args.iters,
                   warmup=args.warmup, baseline="fp32 ring", progress=lambda t: print("  ..", t, flush=True))
    for r in rows:
        if r.variant == "bf16 ring":
            r.type = "bfloat16"
    say(format_table(rows, f"allreduce, N = {comm.size}, NumPy buffers; algbw = 4 B x count / time for every row; "
                           "ratio = fp32-ring time / row time (> 1: faster)"))
    return rows


def device_collective_speed(comm, args, say):
    """GPU rows: the FP8 ring vs the fp32 and 2-byte rings on each device transport of --transports, and
    NCCL's fp32 all-reduce (one GPU per rank only).

    CuPy has no bfloat16 arrays, so the 2-byte ring runs on float16: the same bytes on the wire and
    the same kernels' cost as bf16. The first transport's fp32 ring is the ratio baseline."""
    from ringlab.arrays import use_local_gpu
    use_local_gpu(comm)
    def ring(short, dtype, tr):   # algbw counts 4 B per element on every row
        return allreduce_variant(comm, f"{short} ring {tr}", device=True, dtype=dtype, bytes_per_element=4,
                                 transport=tr)
    variants = []
    for tr in args.transports:
        variants += [ring("fp32", "float32", tr), ring("fp16", "float16", tr),
                     fp8_variant(comm, "ring", device=True, transport=tr)]
    if "staged" in args.transports:
        variants.append(fp8_variant(comm, "direct", device=True, transport="staged"))
    if "ipc" in args.transports:
        from ringlab.gpu.ipc import all_ranks_share_one_gpu
        if all_ranks_share_one_gpu(comm):   # the fastest fp32 ring on one shared GPU, for scale
            variants.append(ring("fp32", "float32", "ipc-shared"))
    variants.append(nccl_variant(comm, "nccl fp32"))    # n/a, with the reason, where ranks share a GPU
    base = f"fp32 ring {args.transports[0]}"
    rows = measure(comm, variants, [s // 4 for s in args.sizes], "float32", "sum", iters=args.iters,
                   warmup=args.warmup, baseline=base, progress=lambda t: print("  ..", t, flush=True))
    for r in rows:
        if r.variant.startswith("fp16"):
            r.type = "float16"
    say(format_table(rows, f"allreduce, N = {comm.size}, CuPy buffers; algbw = 4 B x count / time for every row; "
                           f"ratio = {base} time / row time (> 1: faster)"))
    return rows


def kernel_speed(args, say):
    """Rank 0 only (the others wait): kernel GB/s on the GPU, or a printed reason to skip."""
    if not gpu_available():
        say("\n== 3. kernel speed: skipped (no usable GPU / CuPy on this machine) ==")
        return []
    from ringlab.arrays import use_local_gpu
    use_local_gpu(MPI.COMM_SELF)
    from ringlab.bench.kernel_speed import kernel_speed_variants
    count = args.kernel_size // 4
    say(f"\n== 3. kernel speed: {count} fp32 elements ({args.kernel_size >> 20} MB input), CUDA events ==")
    rows = measure(MPI.COMM_SELF, kernel_speed_variants(), [count], "float32", "sum", iters=args.iters * 4,
                   warmup=args.warmup)
    copy = next((r.algbw for r in rows if r.variant == "device copy"), math.nan)
    say(format_table(rows, "GB/s = (bytes read + written) / time; busbw = algbw here"))
    for r in rows:
        if not r.note:
            say(f"  {r.variant:>22s}: {r.algbw:8.1f} GB/s = {r.algbw / copy:6.1%} of the device copy")
    return rows


def plot_errors(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fmts = sorted({r["fmt"] for r in rows if r["fmt"] != "-"})
    fig, axes = plt.subplots(1, len(fmts), figsize=(6 * len(fmts), 4.2), squeeze=False)
    for ax, fmt in zip(axes[0], fmts):
        for algo, color in (("ring", "tab:red"), ("direct", "tab:blue"), ("bf16 ring", "tab:gray")):
            for dist, style in (("normal", "-"), ("t2", "--")):
                for block, marker in ((min(r["block"] for r in rows if r["fmt"] == fmt), "o"),
                                      (max(r["block"] for r in rows if r["fmt"] == fmt), "s")):
                    pts = sorted((r["nranks"], r["rel_l2"]) for r in rows if r["algo"] == algo and r["dist"] == dist
                                 and (algo == "bf16 ring" or (r["fmt"] == fmt and r["block"] == block)))
                    if not pts or (algo == "bf16 ring" and marker == "s"):
                        continue
                    label = f"{algo} {dist}" + ("" if algo == "bf16 ring" else f" block {block}")
                    ax.plot(*zip(*pts), style, marker=marker, color=color, label=label, alpha=0.85)
        ax.set(xscale="log", yscale="log", xlabel="ranks N", ylabel="relative L2 error", title=f"FP8 {fmt} all-reduce")
        ax.set_xticks(sorted({r["nranks"] for r in rows}), [str(n) for n in sorted({r["nranks"] for r in rows})])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    say(f"ringlab FP8 all-reduce: N = {comm.size} ranks, MPI: {MPI.Get_library_version().splitlines()[0].strip()}")
    result = {"meta": run_metadata(comm, backend=args.backend), "accuracy": [], "speed": [], "kernels": []}
    if not args.no_accuracy and comm.size == 1:
        say("\n== 1. accuracy: skipped (needs N >= 2 ranks: one rank sends nothing and returns its input) ==")
    elif not args.no_accuracy:
        say(f"\n== 1. accuracy: {args.count} elements per rank ==")
        result["accuracy"] = accuracy(comm, args)
        say(format_accuracy(result["accuracy"]))
    if args.backend == "cupy" and not gpu_available():
        say("error: --backend cupy needs CuPy and a CUDA GPU on every rank")
        return 2
    if not args.no_speed and comm.size > 1:
        say(f"\n== 2. collective speed ({args.iters} iters, median of the slowest rank) ==")
        result["speed"] = [asdict(r) for r in collective_speed(comm, args, say)]
    if not args.no_kernels:
        if comm.rank == 0:
            result["kernels"] = [asdict(r) for r in kernel_speed(args, say)]
        comm.Barrier()
    if comm.rank == 0:
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
            print(f"wrote {args.json}")
        if args.plot and result["accuracy"]:
            plot_errors(result["accuracy"], args.plot)
            print(f"wrote {args.plot}")
    wrong = any(r["wrong"] > 0 for r in result["speed"] + result["kernels"])
    if wrong:
        say("FAILED: #wrong > 0")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
