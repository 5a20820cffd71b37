"""Compute/communication overlap, measured: DDP gradient buckets and a TP chunked matmul pipeline.

For each configuration, three runs with the same kernels (collectives/bench/harness.py: check first,
warm-up, barrier-aligned iterations, slowest rank, median): T_comp (compute alone), T_comm
(communication alone), T_both (overlapped). Reported: exposed comm = T_both - T_comp and
overlap efficiency = (T_comp + T_comm - T_both) / min(T_comp, T_comm) (1 = fully hidden, 0 = serial).

    mpirun -n 8 python experiments/overlap.py --plot docs/img/overlap_cpu.png --json out.json   # CPU
    mpirun -n 8 python experiments/overlap.py --backend cupy --hidden 2048 --batch 8192 ...     # GPU

CPU defaults finish in under 2 minutes with 8 ranks on 2 cores; scale with --layers/--hidden/
--batch (DDP) and --tp-m/--tp-k/--tp-n (TP).
"""
import argparse
import json
import os
import sys

# One BLAS thread per rank: the ranks already fill the cores; more threads only fight (set before NumPy).
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.gpu.device import select_transport  # noqa: E402
from ringlab.arrays import use_local_gpu  # noqa: E402
from ringlab.bench.harness import (Case, Variant, busbw_factor, count_wrong, format_table, measure,  # noqa: E402
                               run_metadata)
from ringlab.teach.overlap import (DataParallelStep, GradientBuckets, RowParallelMatmul,  # noqa: E402
                                 SimulatedBackward, row_parallel_operands, row_parallel_reference)

MB = 1 << 20


def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def float_list(text):
    return [float(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", default="numpy", choices=["numpy", "cupy"],
                   help="numpy: host buffers, compute on the caller's thread; cupy: compute on the current "
                        "stream, communication on a separate stream; default %(default)s")
    p.add_argument("--buckets", type=float_list, default=[1, 4, 25, 100], help="DDP bucket sizes in MB; default 1,4,25,100")
    p.add_argument("--layers", type=int, default=32, help="DDP: linear layers (one gradient each); default %(default)s")
    p.add_argument("--hidden", type=int, default=512, help="DDP: layer width; gradient = hidden^2 elements; default %(default)s")
    p.add_argument("--batch", type=int, default=64, help="DDP: batch rows; backward = 4*batch*hidden^2 flops per layer; default %(default)s")
    p.add_argument("--chunks", type=int_list, default=[1, 2, 4, 8], help="TP: row blocks k; default 1,2,4,8")
    p.add_argument("--tp-m", type=int, default=2048, help="TP: rows of X and Y; default %(default)s")
    p.add_argument("--tp-k", type=int, default=128, help="TP: inner size per rank (K = N * this); default %(default)s")
    p.add_argument("--tp-n", type=int, default=1024, help="TP: columns of W and Y; default %(default)s")
    p.add_argument("--iters", type=int, default=3, help="rounds; each times comp, comm and both once (median over rounds of the slowest rank); default %(default)s")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first; default %(default)s")
    p.add_argument("--no-ddp", action="store_true", help="skip the DDP bucket sweep")
    p.add_argument("--no-tp", action="store_true", help="skip the TP chunk sweep")
    p.add_argument("--json", metavar="PATH", help="write rows, the overlap summary and run metadata as JSON")
    p.add_argument("--plot", metavar="PATH", help="write a PNG bar plot of T_comp, T_comm, T_both")
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or min(args.layers, args.hidden, args.batch, args.tp_m, args.tp_k, args.tp_n) < 1:
        p.error("sizes and --iters must be >= 1, --warmup >= 0")
    if any(b <= 0 for b in args.buckets) or any(k < 1 for k in args.chunks):
        p.error("--buckets must be > 0 MB and --chunks >= 1")
    return args


def three_variants(prefix, pattern, check_local, check_reduced, sync, stream):
    """comp / comm / both variants of one configuration, all on the same prepared ``pattern``."""
    def case(run, wrong):
        return Case(run=run, wrong=wrong, sync=sync, stream=stream)

    def comm_case(count, dtype, op):
        pattern.compute()        # the communication-only run needs real inputs in place
        return case(pattern.communicate, check_reduced)
    return [Variant(f"{prefix} comp", lambda c, d, o: case(pattern.compute, check_local)),
            Variant(f"{prefix} comm", comm_case),
            Variant(f"{prefix} both", lambda c, d, o: case(pattern.overlapped, check_reduced))]


def measure_interleaved(comm, variants, count, op, args):
    """bench.measure one timed run per variant per round, ``--iters`` rounds, medians over rounds.

    Interleaving comp, comm and both means load drift (shared cores) hits all three alike,
    which matters because the efficiency is a difference of the three. Every round checks its
    results first (#wrong is the worst round).
    """
    rounds = [measure(comm, variants, [count], "float32", op, iters=1, warmup=args.warmup if i == 0 else 0)
              for i in range(args.iters)]
    rows = []
    for j, v in enumerate(variants):
        samples = [r[j] for r in rounds]
        row = samples[0]
        row.times_us = [s.time_us for s in samples]
        row.time_us = float(np.median(row.times_us))
        row.wrong = max(s.wrong for s in samples)
        row.algbw = row.size / (row.time_us * 1e-6) / 1e9
        row.busbw = row.algbw * busbw_factor(v.collective, comm.size)
        rows.append(row)
    return rows


def summarize(pattern_name, config, rows):
    t = {r.variant.rsplit(" ", 1)[1]: r.time_us * 1e-3 for r in rows}
    comp, comm, both = t["comp"], t["comm"], t["both"]
    return {"pattern": pattern_name, "config": config, "bytes": rows[0].size, "t_comp_ms": comp,
            "t_comm_ms": comm, "t_both_ms": both, "exposed_ms": both - comp,
            "efficiency": (comp + comm - both) / min(comp, comm), "wrong": sum(r.wrong for r in rows)}


def ddp_sweep(comm, args, xp, sync, stream, say):
    n = comm.size
    backward = SimulatedBackward(args.layers, args.hidden, args.batch, "float32", comm.rank, xp)
    # Exact float32 references (integers < 2^24) from a float64 closed form: no communication.
    # base[l] = A_l^T dY_l; this rank's gradient is (rank+1) * base, the average (N+1)/2 * base.
    base = [backward.reference(l, 1, "sum").astype(xp.float32) for l in range(args.layers)]
    results, rows = [], []
    for mb in args.buckets:
        buckets = GradientBuckets(backward.shapes, "float32", int(mb * MB), comm, "avg", xp, validate=False)
        step = DataParallelStep(backward, buckets)

        def check_local():
            return sum(count_wrong(buckets.grad(l), base[l].reshape(-1) * (comm.rank + 1.0), "float32", "sum", n, xp)
                       for l in range(args.layers))

        def check_reduced():
            return sum(count_wrong(buckets.reduced(l), base[l].reshape(-1) * ((n + 1) / 2), "float32", "avg", n, xp)
                       for l in range(args.layers))
        name = f"ddp {mb:g}MB"
        variants = three_variants(name, step, check_local, check_reduced, sync, stream)
        count = args.layers * args.hidden ** 2
        got = measure_interleaved(comm, variants, count, "avg", args)
        rows += got
        summary = summarize("ddp", f"bucket {mb:g} MB ({len(buckets.buckets)} buckets)", got)
        results.append(summary)
        say(_line(summary))
    return results, rows


def tp_sweep(comm, args, xp, sync, stream, say):
    n = comm.size
    x, w = row_parallel_operands(args.tp_m, args.tp_k, args.tp_n, comm.rank, "float32", xp)
    ref = row_parallel_reference(args.tp_m, args.tp_k, args.tp_n, n, xp).reshape(-1)
    local = (x.astype(xp.float64) @ w.astype(xp.float64)).reshape(-1)
    results, rows = [], []
    for k in args.chunks:
        tp = RowParallelMatmul(x, w, k, comm, "sum", validate=False)
        variants = three_variants(f"tp k={k}", tp, lambda: count_wrong(tp.partial, local, "float32", "sum", n, xp),
                                  lambda: count_wrong(tp.out, ref, "float32", "sum", n, xp), sync, stream)
        got = measure_interleaved(comm, variants, args.tp_m * args.tp_n, "sum", args)
        rows += got
        summary = summarize("tp", f"k = {k} ({len(tp.rows)} blocks)", got)
        results.append(summary)
        say(_line(summary))
    return results, rows


HEADER = (f"#{'pattern':>7s} {'config':>26s} {'bytes':>11s} {'T_comp':>9s} {'T_comm':>9s} {'T_both':>9s} "
          f"{'exposed':>9s} {'effic.':>7s} {'#wrong':>7s}\n"
          f"#{'':>7s} {'':>26s} {'':>11s} {'(ms)':>9s} {'(ms)':>9s} {'(ms)':>9s} {'(ms)':>9s} {'':>7s} {'':>7s}")


def _line(s):
    return (f" {s['pattern']:>7s} {s['config']:>26s} {s['bytes']:>11d} {s['t_comp_ms']:9.1f} {s['t_comm_ms']:9.1f} "
            f"{s['t_both_ms']:9.1f} {s['exposed_ms']:9.1f} {s['efficiency']:7.2f} {s['wrong']:>7d}")


def plot(path, summaries, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = [g for g in ("ddp", "tp") if any(s["pattern"] == g for s in summaries)]
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.2), squeeze=False)
    for ax, g in zip(axes[0], groups):
        mine = [s for s in summaries if s["pattern"] == g]
        xs = np.arange(len(mine))
        for j, (key, label) in enumerate((("t_comp_ms", "T_comp"), ("t_comm_ms", "T_comm"), ("t_both_ms", "T_both"))):
            ax.bar(xs + (j - 1) * 0.27, [s[key] for s in mine], 0.27, label=label)
        for x, s in zip(xs, mine):
            top = max(s["t_comp_ms"], s["t_comm_ms"], s["t_both_ms"])
            ax.annotate(f"eff {s['efficiency']:.2f}", (x, top), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(xs, [s["config"].split(" (")[0] for s in mine])
        ax.set_ylabel("time (ms, median of slowest rank)")
        ax.set_title({"ddp": "DDP: bucketed gradient all-reduce", "tp": "TP: chunked row-parallel matmul"}[g])
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    if args.backend == "cupy":
        gpu = use_local_gpu(comm)
        import cupy as xp
        stream = xp.cuda.get_current_stream()
        transport, _, why = select_transport(comm)
        sync, where = stream.synchronize, f"GPU (CuPy; rank 0 on GPU {gpu}; comm transport {transport}: {why})"
    else:
        xp, stream, sync = np, None, (lambda: None)
        where = f"CPU (NumPy; {comm.size} ranks on {os.cpu_count()} cores{': oversubscribed' if comm.size > (os.cpu_count() or 1) else ''})"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    title = f"overlap, N = {comm.size}, {where}, load average {load:.1f} at start"
    say(f"# {title}\n# efficiency = (T_comp + T_comm - T_both) / min(T_comp, T_comm); exposed = T_both - T_comp")
    say(HEADER)
    summaries, rows = [], []
    for enabled, sweep in ((not args.no_ddp, ddp_sweep), (not args.no_tp, tp_sweep)):
        if enabled:
            s, r = sweep(comm, args, xp, sync, stream, say)
            summaries += s
            rows += r
    say("\n" + format_table(rows, "harness rows (algbw/busbw are meaningful on the 'comm' rows only)"))
    if comm.rank == 0:
        if args.json:
            from dataclasses import asdict
            meta = run_metadata(comm, backend=args.backend, where=where, load_average=load, args=vars(args))
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "overlap": summaries, "rows": [asdict(r) for r in rows]}, f, indent=1)
            print(f"wrote {args.json}")
        if args.plot:
            plot(args.plot, summaries, title)
            print(f"wrote {args.plot}")
    wrong = sum(s["wrong"] for s in summaries)
    if wrong:
        say(f"FAILED: {wrong} wrong elements")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
