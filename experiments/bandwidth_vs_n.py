"""Bus bandwidth vs message size and vs N, for the ring, the MPI library's Allreduce and NCCL; α-β fit.

One job of NMAX ranks sweeps N = 2..NMAX with sub-communicators (comm.Split); ranks outside the
current one wait at a barrier that sleeps instead of spinning, so they do not steal the cores.

    mpirun -n 8 python experiments/bandwidth_vs_n.py -b 1K -e 1M -f 4 --json sweep.json \\
        --fit fit.json --plot-prefix docs/img/bw_cpu
    python experiments/bandwidth_vs_n.py --refit sweep.json --fit fit.json   # fit/plot a saved sweep
"""
import argparse
import math
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.bench import variants as variant_library  # noqa: E402
from ringlab.teach.alphabeta import (fit_alpha_beta, format_fit_report, ring_step_variant, samples_from_rows,  # noqa: E402
                                   write_fits)
from ringlab.arrays import gpu_available, use_local_gpu  # noqa: E402
from ringlab.bench.harness import (Unavailable, Variant, format_table, measure, parse_size, run_metadata,  # noqa: E402
                               size_arg, sizes_from_range, write_json)

VARIANT_NAMES = ("ring", "mpi-native", "nccl")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-b", "--minbytes", type=size_arg, default=parse_size("1K"), help="smallest size; default 1K")
    p.add_argument("-e", "--maxbytes", type=size_arg, default=parse_size("1M"), help="largest size; default 1M")
    p.add_argument("-f", "--stepfactor", type=float, default=4, help="size multiplier; default %(default)s")
    p.add_argument("--nranks", default="", help="comma-separated N to sweep (each <= the job size); default 2..NMAX")
    p.add_argument("--variants", default=",".join(VARIANT_NAMES),
                   help=f"comma-separated subset of {','.join(VARIANT_NAMES)}; default all (n/a rows say why)")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per point; default %(default)s")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first; default %(default)s")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "int32", "int64"])
    p.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"])
    p.add_argument("--no-step-latency", action="store_true", help="skip timing one ring step alone (alpha check)")
    p.add_argument("--json", metavar="PATH", help="write every row and the run metadata")
    p.add_argument("--fit", metavar="PATH", help="write the alpha-beta fits (ringlab.alphabeta/1 JSON)")
    p.add_argument("--plot-prefix", metavar="PREFIX", help="write PREFIX_vs_size.png and PREFIX_vs_n.png")
    p.add_argument("--label", default="", help="text for plot titles, e.g. 'CPU, 2 cores oversubscribed'")
    p.add_argument("--fit-nranks", default="", help="fit only these N (e.g. 2 when N > cores oversubscribes); default all")
    p.add_argument("--refit", metavar="SWEEP_JSON", help="no run: fit (and plot) a sweep written by --json")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in args.variants if v not in VARIANT_NAMES]
    if bad:
        p.error(f"unknown variants {bad}; choose from {VARIANT_NAMES}")
    if args.iters < 1 or args.warmup < 0 or args.stepfactor < 1 or args.minbytes > args.maxbytes:
        p.error("need --iters >= 1, --warmup >= 0, -f >= 1 and -b <= -e")
    return args


def _unavailable(name, reason):
    def prepare(count, dtype, op):
        raise Unavailable(reason)
    return Variant(name, prepare)


def nccl_variant(comm, device):
    """The NCCL hook: ``collectives.variants.nccl_variant(comm)`` once it exists, else an n/a row."""
    factory = getattr(variant_library, "nccl_variant", None)
    if factory is None:
        return _unavailable("nccl", "no NCCL variant in ringlab.bench.variants yet")
    if not device:
        return _unavailable("nccl", "NCCL needs GPU buffers (--backend cupy)")
    return factory(comm)


def build_variants(comm, names, device):
    made = {"ring": lambda: variant_library.allreduce_variant(comm, "ring", device=device),
            "mpi-native": lambda: variant_library.mpi_native_variant(comm, device=device),
            "nccl": lambda: nccl_variant(comm, device)}
    return [made[name]() for name in names]


def wait_at_barrier(comm, poll_s=0.002):
    """Barrier that sleeps between polls: idle ranks must not spin on the cores the sweep is timing."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(poll_s)


class Progress:
    """'[ 12/84  14%] N=3 ...  eta 40 s' lines on rank 0's stderr for long sweeps."""

    def __init__(self, total, enabled):
        self.total, self.done, self.enabled, self.t0 = total, 0, enabled, time.monotonic()

    def __call__(self, text):
        self.done += 1
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        print(f"[{self.done:4d}/{self.total} {100 * self.done / self.total:3.0f}%] {text}  "
              f"elapsed {elapsed:5.0f} s, eta {eta:5.0f} s", file=sys.stderr, flush=True)

    def catch_up(self, done):
        """Count points that printed nothing (n/a rows) so the percentage stays honest."""
        self.done = max(self.done, done)


def sweep(world, args, device):
    """Rows for every N, size and variant (complete on world rank 0), and per-N single-step times."""
    nmax = world.size
    nlist = sorted({int(x) for x in args.nranks.split(",") if x.strip()}) if args.nranks else list(range(2, nmax + 1))
    if not nlist or min(nlist) < 2 or max(nlist) > nmax:
        raise SystemExit(f"--nranks must lie in 2..{nmax} (the job size), got {nlist}")
    itemsize = np.dtype(args.dtype).itemsize
    counts = sizes_from_range(args.minbytes, args.maxbytes, args.stepfactor, itemsize)
    per_n = len(counts) * len(args.variants) + (0 if args.no_step_latency else 1)
    progress = Progress(len(nlist) * per_n, enabled=world.rank == 0 and not args.quiet)
    rows, steps = [], {}
    for n in nlist:
        sub = world.Split(0 if world.rank < n else MPI.UNDEFINED, world.rank)
        if sub != MPI.COMM_NULL:
            label = lambda text, n=n: progress(f"N={n:<3d}{text}")  # noqa: E731
            got = measure(sub, build_variants(sub, args.variants, device), counts, args.dtype, "sum",
                          iters=args.iters, warmup=args.warmup, baseline="mpi-native" if "mpi-native" in args.variants else None,
                          progress=label)
            if sub.rank == 0:
                print(format_table(got, f"allreduce, N = {n}, ratio = mpi-native time / variant time"), flush=True)
            rows += got
            progress.catch_up(nlist.index(n) * per_n + len(counts) * len(args.variants))
            if not args.no_step_latency:
                step = measure(sub, [ring_step_variant(sub)], [counts[0] or 1], args.dtype, "sum",
                               iters=args.iters, warmup=args.warmup, progress=label)[0]
                steps[n] = step.time_us * 1e-6 if step.wrong == 0 else math.nan
            sub.Free()
        wait_at_barrier(world)
    return rows, steps


def fit_all(rows, variants_seen, steps, meta, only_nranks=""):
    """An α-β fit per variant that has enough timed rows; prints each report."""
    keep = {int(x) for x in only_nranks.split(",") if x.strip()}
    fits = []
    for name in variants_seen:
        samples = [s for s in samples_from_rows(rows, name) if not keep or s[1] in keep]
        try:
            fit = fit_alpha_beta(samples)
        except ValueError as exc:
            print(f"# no alpha-beta fit for {name}: {exc}")
            continue
        fit.algo, fit.dtype, fit.date = name, meta.get("dtype", ""), meta.get("date", "")
        fit.machine = {k: meta.get(k) for k in ("host", "backend", "device", "mpi")}
        finite = [t for n, t in steps.items() if math.isfinite(t) and (not keep or n in keep)]
        fit.step_latency_s = float(np.median(finite)) if finite else None
        print(format_fit_report(fit, samples))
        if name != "ring":
            print(f"# ({name} need not be a ring: its alpha and beta are effective values of the same model)")
        fits.append(fit)
    return fits


def plot(rows, prefix, label, fits=()):
    """busbw vs size (a line per N) and busbw vs N (a line per size), one panel per variant; the
    fitted α-β model of a variant, if given, is drawn dashed in the same colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    get = (lambda r, k: r[k]) if rows and isinstance(rows[0], dict) else getattr
    timed = [r for r in rows if get(r, "time_us") is not None and math.isfinite(get(r, "time_us"))
             and get(r, "busbw") > 0 and get(r, "variant") in VARIANT_NAMES]
    names = [v for v in VARIANT_NAMES if any(get(r, "variant") == v for r in timed)]
    models = {f.algo: f for f in fits}
    paths = []
    for kind in ("size", "n") if names else ():
        fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
        for ax, name in zip(axes[0], names):
            mine = [r for r in timed if get(r, "variant") == name]
            key, other = ("nranks", "size") if kind == "size" else ("size", "nranks")
            for g in sorted({get(r, key) for r in mine}):
                pts = sorted((get(r, other), get(r, "busbw")) for r in mine if get(r, key) == g)
                xs = np.array([p[0] for p in pts], dtype=float)
                line, = ax.plot(xs, [p[1] for p in pts], marker="o", ms=3,
                                label=f"N = {g}" if kind == "size" else _human(g))
                if name in models:
                    size, n = (xs, g) if kind == "size" else (g, xs)
                    busbw = 2 * (n - 1) / n * size / models[name].predict(size, n) / 1e9
                    ax.plot(xs, busbw, ls="--", lw=1, color=line.get_color())
            ax.set_yscale("log")
            if kind == "size":
                ax.set_xscale("log", base=2)
                ax.set_xlabel("message size (bytes)")
            else:
                ax.set_xticks(sorted({get(r, "nranks") for r in mine}))
                ax.set_xlabel("N (ranks)")
            ax.set_title(name + (" (dashed: alpha-beta fit)" if name in models else ""))
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=7, ncol=2)
            ax.set_ylabel("busbw (GB/s)")
        fig.suptitle(f"all-reduce bus bandwidth vs {'message size' if kind == 'size' else 'N'}"
                     + (f" ({label})" if label else ""))
        fig.tight_layout()
        path = f"{prefix}_vs_{kind}.png"
        fig.savefig(path, dpi=110, metadata={"Software": None})
        plt.close(fig)
        paths.append(path)
    return paths


def _human(size):
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


def refit(args):
    import json
    with open(args.refit) as f:
        doc = json.load(f)
    rows, meta = doc["rows"], doc["meta"]
    steps = {int(k): v for k, v in meta.get("step_latency_s", {}).items()}
    names = [v for v in VARIANT_NAMES if any(r["variant"] == v for r in rows)]
    fits = fit_all(rows, names, steps, meta, args.fit_nranks)
    if args.fit and fits:
        write_fits(args.fit, fits, meta)
        print(f"wrote {args.fit}")
    for path in plot(rows, args.plot_prefix, args.label, fits) if args.plot_prefix else []:
        print(f"wrote {path}")
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.refit:
        return refit(args)
    world = MPI.COMM_WORLD
    device = args.backend == "cupy" or (args.backend == "auto" and gpu_available())
    where = "numpy host buffers"
    if device:
        where = f"cupy device buffers (GPU {use_local_gpu(world)} on rank 0)"
    if world.rank == 0:
        print(f"# bandwidth vs N: job of {world.size} ranks, {where}, {args.iters} iters; "
              f"MPI: {MPI.Get_library_version().splitlines()[0].strip()}", flush=True)
    rows, steps = sweep(world, args, device)
    wrong = any(r.wrong > 0 for r in rows)
    if world.rank != 0:
        return 1 if wrong else 0
    meta = run_metadata(world, backend="cupy" if device else "numpy", dtype=args.dtype, label=args.label,
                        device=_device_name(device), step_latency_s={str(k): v for k, v in steps.items()})
    if args.json:
        write_json(args.json, rows, meta)
        print(f"wrote {args.json}")
    fits = fit_all(rows, args.variants, steps, meta, args.fit_nranks)
    if args.fit and fits:
        write_fits(args.fit, fits, meta)
        print(f"wrote {args.fit}")
    for path in plot(rows, args.plot_prefix, args.label, fits) if args.plot_prefix else []:
        print(f"wrote {path}")
    if wrong:
        print("FAILED: some rows have #wrong > 0")
    return 1 if wrong else 0


def _device_name(device):
    if not device:
        import platform
        return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


if __name__ == "__main__":
    sys.exit(main())
