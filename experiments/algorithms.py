"""Beyond the ring: latency-optimal and hierarchical all-reduce vs the ring vs the MPI library, 8 B .. MBs.

    mpirun -n 8 python experiments/algorithms.py                       # default sweep, ratio vs ring
    mpirun -n 8 python experiments/algorithms.py --ranks-per-node 2 --json out.json --plot out.png

Every variant is checked against a float64 reference before it is timed (#wrong). The ratio column
is ring time / variant time (> 1: faster than the ring). On a CPU box the numbers are CPU numbers:
NumPy host buffers over MPI shared memory, ranks possibly oversubscribed on few cores.
"""
import argparse
import math
import os
import sys
import warnings

from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ringlab  # noqa: E402,F401  registers the algorithms
from ringlab.api import register_allreduce  # noqa: E402
from ringlab.bench.harness import check_dtype_op, format_table, measure, run_metadata, size_list_arg, write_json  # noqa: E402,E501
from ringlab.hierarchical import make_hierarchical  # noqa: E402
from ringlab.bench.tuner import load_tuning, tuning_path  # noqa: E402
from ringlab.bench.variants import allreduce_variant, mpi_native_variant  # noqa: E402

SMALL_LIMIT = 64 * 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size_list_arg, default="8,64,512,4K,16K,64K,256K,1M,4M",
                   help="message sizes in bytes (K/M suffixes); default %(default)s")
    p.add_argument("--algos", default="ring,recursive_doubling,rabenseifner,ring_bidir,direct,hierarchical,auto",
                   help="ringlab algorithms to compare; default %(default)s")
    p.add_argument("--ranks-per-node", type=int, default=None,
                   help="declared node size for 'hierarchical' (default $RINGLAB_RANKS_PER_NODE or the real node)")
    p.add_argument("--no-mpi", action="store_true", help="skip the MPI library's own Allreduce")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--op", default="sum")
    p.add_argument("--json", metavar="PATH")
    p.add_argument("--plot", metavar="PNG", help="time vs size, one line per variant")
    args = p.parse_args(argv)
    check_dtype_op(p, "float32", args.op)
    args.algos = [a for a in args.algos.split(",") if a]
    return args


def summarize(rows, limit=SMALL_LIMIT, baseline="ring"):
    """Per size <= limit: the fastest non-baseline variant and its speedup over the baseline."""
    out = []
    for size in sorted({r.size for r in rows if r.size <= limit}):
        here = [r for r in rows if r.size == size and not math.isnan(r.time_us)]
        base = next((r for r in here if r.variant == baseline), None)
        others = [r for r in here if r.variant != baseline and r.variant != "mpi-native"]
        if base is None or not others:
            continue
        best = min(others, key=lambda r: r.time_us)
        out.append({"size": size, "best": best.variant, "speedup_vs_ring": base.time_us / best.time_us,
                    "ring_us": base.time_us, "best_us": best.time_us})
    return out


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r.variant for r in rows):
        pts = [(r.size, r.time_us) for r in rows if r.variant == name and not math.isnan(r.time_us)]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="message size (bytes)", ylabel="time (us, median of slowest rank)",
           title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    # the header below says whether auto is tuned; the library's own warning would land mid-table
    warnings.filterwarnings("ignore", message="ringlab auto: no tuning file")
    comm = MPI.COMM_WORLD
    n, say = comm.size, (print if comm.rank == 0 else (lambda *a, **k: None))
    variants = []
    for algo in args.algos:
        name = algo
        if algo == "hierarchical" and args.ranks_per_node:
            name = f"hier(L={args.ranks_per_node})"
            register_allreduce(name, make_hierarchical(args.ranks_per_node))
            algo = name
        variants.append(allreduce_variant(comm, name, algo=algo))
    if not args.no_mpi:
        variants.append(mpi_native_variant(comm))
    cores = os.cpu_count()
    where = f"CPU: NumPy host buffers, N = {n} ranks on {cores} cores{' (oversubscribed)' if n > cores else ''}"
    tuned = load_tuning() is not None if comm.rank == 0 else None
    tuned = comm.bcast(tuned)
    say(f"ringlab algorithms: {where}; MPI: {MPI.Get_library_version().splitlines()[0].strip()}")
    say(f"auto: {'tuning file ' + tuning_path() if tuned else 'no tuning file, built-in defaults'}")
    rows = measure(comm, variants, [max(s // 4, 1) for s in args.sizes], "float32", args.op, iters=args.iters,
                   warmup=args.warmup, baseline="ring", progress=lambda t: print("  ..", t, flush=True))
    say(format_table(rows, f"allreduce float32, N = {n}, {where}; ratio = ring time / variant time (> 1: faster)"))
    summary = summarize(rows)
    say(f"\n# small messages (<= {SMALL_LIMIT // 1024} KB): best algorithm vs ring ({where})")
    for s in summary:
        say(f"  {s['size']:>8d} B  {s['best']:>20s}  {s['best_us']:10.1f} us vs ring {s['ring_us']:10.1f} us"
            f"  = {s['speedup_vs_ring']:.2f}x")
    if summary:
        worst = min(s["speedup_vs_ring"] for s in summary)
        say(f"  goal >= 2x at every size <= 64 KB: {'met' if worst >= 2 else 'NOT met'} (smallest speedup {worst:.2f}x)")
    if comm.rank == 0:
        if args.json:
            meta = run_metadata(comm, backend="numpy", device="CPU", cores=cores, tuned=bool(tuned),
                                ranks_per_node=args.ranks_per_node, small_message_summary=summary)
            write_json(args.json, rows, meta)
            print(f"wrote {args.json}")
        if args.plot:
            plot(rows, args.plot, f"all-reduce, N = {n} ({where})")
            print(f"wrote {args.plot}")
    return 1 if any(r.wrong > 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
