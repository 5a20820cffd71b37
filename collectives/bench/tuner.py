"""``algo="auto"``: pick the all-reduce algorithm per (size, N) from alpha-beta models fitted to this machine."""
# Like NCCL's tuner, each algorithm has a cost model T(S, N) = a(N) alpha + b(N) S / beta whose
# coefficients come from its schedule, and alpha, beta are fitted per algorithm from a sweep:
#
#     ring                 a = 2(N-1)                       b = 2(N-1)/N
#     ring_bidir           a = 2(N-1)                       b = (N-1)/N  (each direction carries S/2)
#     recursive_doubling   a = log2 p + 2f                  b = log2 p + 2f
#     rabenseifner         a = 2 log2 p + 2f                b = 2(p-1)/p + 2f
#     direct               a = 1                            b = N-1      (all-to-all in one round)
#
# (p = largest power of two <= N; f = 1 when N is not a power of two: the fold and unfold steps move S.)
#
#     mpirun -n 8 python -m ringlab.bench.tuner          # measure, fit, write the tuning file
#     python -m ringlab.bench.tuner --nranks 8           # the same, launching mpirun itself
#
# The file is $RINGLAB_TUNING or ~/.cache/ringlab/tuning.json; fits are kept per N. Without it auto
# uses built-in defaults and warns once. Every rank decides from (S, N, table) with the table broadcast
# from rank 0 once per communicator, so all ranks pick the same algorithm.

import argparse
import json
import math
import os
import sys
import warnings

import numpy as np

from ringlab import settings
from ringlab.schedule import fold_layout
from ringlab.commstate import comm_state

__all__ = ["cost_coefficients", "predict_us", "fit_alpha_beta", "choose_algorithm", "load_tuning", "tuning_path",
           "auto_allreduce_inplace", "auto_allreduce_into", "DEFAULT_FITS", "main"]

ENV_TUNING = "RINGLAB_TUNING"
# Built-in guesses for a CPU MPI run from Python: one step costs tens of microseconds of overhead.
# ring_bidir and direct are left out: whether two directions beat one, or N-1 simultaneous messages beat
# log2 N rounds, depends on the links and the MPI, so only a measured fit may choose them. Recursive
# doubling reduces the whole buffer at every step (the ring 1/N of it), so its bytes count double: on
# 2 ranks it then wins only below ~40 KB, where it and the ring cost the same (docs/results/overhead).
DEFAULT_FITS = {
    "ring": {"alpha_us": 20.0, "beta_GBps": 2.0},
    "recursive_doubling": {"alpha_us": 20.0, "beta_GBps": 1.0},
    "rabenseifner": {"alpha_us": 20.0, "beta_GBps": 2.0},
}
TUNED_ALGORITHMS = ("ring", "recursive_doubling", "rabenseifner", "ring_bidir", "direct")
_warned = set()


def cost_coefficients(algo, n):
    """(a, b) with T = a * alpha + b * S / beta for ``algo`` on ``n`` ranks (see the table above)."""
    if n <= 1:
        return 0.0, 0.0
    p, rem = fold_layout(n)
    k, f = math.log2(p), (1 if rem else 0)
    if algo == "ring":
        return 2 * (n - 1), 2 * (n - 1) / n
    if algo == "ring_bidir":
        return 2 * (n - 1), (n - 1) / n
    if algo == "recursive_doubling":
        return k + 2 * f, k + 2 * f
    if algo == "rabenseifner":
        return 2 * k + 2 * f, 2 * (p - 1) / p + 2 * f
    if algo == "direct":
        return 1, n - 1
    raise ValueError(f"no cost model for {algo!r}; modelled: {', '.join(TUNED_ALGORITHMS)}")


def predict_us(algo, nbytes, n, fit):
    """Model time in microseconds for one all-reduce of ``nbytes`` on ``n`` ranks."""
    a, b = cost_coefficients(algo, n)
    return a * fit["alpha_us"] + b * nbytes / (fit["beta_GBps"] * 1e3)   # GB/s = 1e3 bytes/us


def fit_alpha_beta(algo, n, sizes, times_us):
    """Least-squares alpha (us) and beta (GB/s) from measured (size, time) points at ``n`` ranks.

    Rows are weighted by 1/t so an 8-byte point counts as much as a 4-MB one (relative error);
    a negative alpha or beta is clamped to zero and the other refitted alone.
    """
    a, b = cost_coefficients(algo, n)
    S, t = np.asarray(sizes, float), np.asarray(times_us, float)
    ok = np.isfinite(t) & (t > 0)
    S, t = S[ok], t[ok]
    if len(t) == 0 or a == 0:
        return {"alpha_us": 0.0, "beta_GBps": math.inf}
    design = np.stack([np.full_like(S, a), b * S], axis=1) / t[:, None]
    (alpha, gamma), *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
    if alpha < 0:
        alpha, gamma = 0.0, float(np.sum(b * S * t) / max(np.sum((b * S) ** 2), 1e-30))
    if gamma <= 0:
        gamma, alpha = 0.0, float(np.median(t / a))
    return {"alpha_us": float(alpha), "beta_GBps": (1e-3 / gamma) if gamma > 0 else math.inf}


def tuning_path():
    return settings.get(ENV_TUNING) or os.path.join(os.path.expanduser("~"), ".cache", "ringlab", "tuning.json")


def load_tuning(path=None):
    """The tuning table ({"fits": {"N": {algo: fit}}}) or None when there is no readable file."""
    path = path or tuning_path()
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warnings.warn(f"ringlab auto: ignoring unreadable tuning file {path}: {exc}")
        return None
    if not isinstance(table, dict) or not isinstance(table.get("fits"), dict):
        warnings.warn(f"ringlab auto: ignoring tuning file {path}: no 'fits' table")
        return None
    return table


def _fits_for(table, n):
    """The fitted algorithms for N = n, else for the nearest measured N (alpha, beta move little with N)."""
    if not table or not table.get("fits"):
        return DEFAULT_FITS, "built-in defaults"
    fits = table["fits"]
    key = str(n) if str(n) in fits else min(fits, key=lambda k: (abs(math.log2(int(k)) - math.log2(max(n, 1))), int(k)))
    return fits[key], f"tuned at N={key}"


def choose_algorithm(nbytes, n, table=None, available=None):
    """(name, {algo: predicted us}, source): the algorithm with the lowest model time.

    Pure and deterministic in (nbytes, n, table), so ranks that agree on the table agree on the pick;
    ties go to the earlier algorithm in TUNED_ALGORITHMS.
    """
    fits, source = _fits_for(table, n)
    names = [a for a in TUNED_ALGORITHMS if a in fits and (available is None or a in available)]
    if not names:
        return "ring", {}, source + " (no usable fit: ring)"
    predicted = {a: predict_us(a, nbytes, n, fits[a]) for a in names}
    return min(names, key=lambda a: predicted[a]), predicted, source


def _agreed_table(comm, cache):
    """Load the tuning file once per communicator and broadcast rank 0's copy, so every rank uses one table."""
    cache = comm_state(comm)   # lives as long as comm: a freed handle reused by MPI never hits it
    key = "tuning-table"
    if key not in cache:
        path = tuning_path()
        table = load_tuning(path) if comm.rank == 0 else None
        if comm.size > 1:
            table = comm.bcast(table, root=0)
        if table is None and comm.rank == 0 and path not in _warned:
            _warned.add(path)
            warnings.warn(f"ringlab auto: no tuning file at {path}; using built-in alpha-beta defaults. "
                          f"Run `mpirun -n {comm.size} python -m ringlab.bench.tuner` to measure this machine.",
                          stacklevel=2)
        cache[key] = table
    return cache[key]


def _pick(buf, transport, cache):
    from ringlab.api import ALLREDUCE_ALGORITHMS
    comm = transport.comm
    picks = comm_state(comm).setdefault("auto-picks", {})   # (bytes, N) -> name: the model runs once per size
    key = (buf.nbytes, comm.size, len(ALLREDUCE_ALGORITHMS))
    name = picks.get(key)
    if name is None:
        name = picks[key] = choose_algorithm(buf.nbytes, comm.size, _agreed_table(comm, cache),
                                             available=ALLREDUCE_ALGORITHMS)[0]
    cache["last_choice"] = name
    return ALLREDUCE_ALGORITHMS[name], cache.setdefault(name, {})


def auto_allreduce_inplace(buf, transport, op="sum", cache=None):
    """Run the algorithm ``choose_algorithm`` picks for this buffer's size and the communicator's N."""
    cache = cache if cache is not None else {}
    fn, own = _pick(buf, transport, cache)
    fn(buf, transport, op, own)


def auto_allreduce_into(x, out, transport, op="sum", cache=None):
    """The same out of place: the pick's own out-of-place form when it has one (no copy of ``x``)."""
    cache = cache if cache is not None else {}
    fn, own = _pick(x, transport, cache)
    into = getattr(fn, "into", None)
    if into is not None:
        into(x, out, transport, op, own)
        return
    out[...] = x
    fn(out, transport, op, own)


# ---- measuring: python -m ringlab.bench.tuner -------------------------------------------------------

def measure_and_fit(comm, sizes, algos=TUNED_ALGORITHMS, iters=10, warmup=3, progress=None):
    """Time each algorithm at each size with bench.measure (checked first) and fit alpha, beta per algorithm."""
    from ringlab.bench.harness import measure
    from ringlab.bench.variants import allreduce_variant
    counts = sorted({max(s // 4, 1) for s in sizes})
    variants = [allreduce_variant(comm, a, algo=a) for a in algos]
    rows = measure(comm, variants, counts, "float32", "sum", iters=iters, warmup=warmup, progress=progress)
    wrong = [r for r in rows if r.wrong != 0]
    if wrong:
        raise RuntimeError(f"tuner: {len(wrong)} measurements failed the correctness check; not fitting")
    fits = {}
    for a in algos:
        pts = [(r.size, r.time_us) for r in rows if r.variant == a]
        fit = fit_alpha_beta(a, comm.size, [p[0] for p in pts], [p[1] for p in pts])
        fit["points"] = [[int(s), round(t, 2)] for s, t in pts]
        fits[a] = fit
    return fits, rows


def write_tuning(path, n, fits, meta):
    """Merge the fits for N = n into the file at ``path`` (other N's fits are kept)."""
    table = load_tuning(path) or {"version": 1, "fits": {}}
    table["fits"][str(n)] = fits
    table.setdefault("meta", {})[str(n)] = meta
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, default=lambda x: None)


def format_fits(fits, n, sizes):
    """Fitted alpha/beta per algorithm, then the model's pick per size."""
    lines = [f"# alpha-beta fits at N = {n} (CPU numbers when run on CPU)",
             f"#{'algorithm':>19s} {'alpha (us)':>11s} {'beta (GB/s)':>12s}   model a(N), b(N)"]
    for a, fit in fits.items():
        ca, cb = cost_coefficients(a, n)
        lines.append(f" {a:>19s} {fit['alpha_us']:11.2f} {fit['beta_GBps']:12.3f}   {ca:.2f}, {cb:.3f}")
    lines.append(f"# auto picks (model time in us per algorithm)")
    for s in sizes:
        name, pred, _ = choose_algorithm(s, n, {"fits": {str(n): fits}})
        lines.append(f" {s:>12d} B -> {name:<19s} " + "  ".join(f"{a}={t:.0f}" for a, t in pred.items()))
    return "\n".join(lines)


def _parse_sizes(text):
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    out = []
    for tok in text.split(","):
        tok = tok.strip().upper().rstrip("B")
        if tok:
            out.append(int(float(tok[:-1]) * mult[tok[-1]]) if tok[-1] in mult else int(tok))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="Measure the host all-reduce algorithms and write the auto tuning file.")
    p.add_argument("--sizes", default="8,1K,16K,128K,1M,4M", help="message sizes in bytes (K/M suffixes); default %(default)s")
    p.add_argument("--algos", default=",".join(TUNED_ALGORITHMS), help="algorithms to fit; default %(default)s")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", default=None, help=f"tuning file (default ${ENV_TUNING} or ~/.cache/ringlab/tuning.json)")
    p.add_argument("--nranks", type=int, default=None, help="launch mpirun -n NRANKS when started without mpirun")
    args = p.parse_args(argv)
    from mpi4py import MPI
    comm = MPI.COMM_WORLD
    if comm.size == 1 and args.nranks and args.nranks > 1:
        import subprocess
        from ringlab.launch import mpirun_command
        argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        cmd = mpirun_command(args.nranks, sys.executable, "-m", "ringlab.bench.tuner", *argv)
        return subprocess.call(cmd)
    algos = [a for a in args.algos.split(",") if a]
    for a in algos:
        cost_coefficients(a, 2)   # unknown names fail here, before any measuring
    sizes = _parse_sizes(args.sizes)
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    say(f"ringlab tuner: N = {comm.size}, sizes {sizes}, algorithms {', '.join(algos)} (CPU host buffers)")
    fits, _ = measure_and_fit(comm, sizes, algos, args.iters, args.warmup,
                              progress=lambda t: print("  ..", t, flush=True))
    say(format_fits({a: f for a, f in fits.items()}, comm.size, sizes))
    if comm.rank == 0:
        from ringlab.bench.harness import run_metadata
        path = args.out or tuning_path()
        write_tuning(path, comm.size, fits, run_metadata(comm, backend="numpy"))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
