"""The α-β model of ring all-reduce, fitted to measured sweeps, and the fit's JSON (read by the auto-tuner)."""
#     T(S, N) = 2(N-1)·α + 2(N-1)/N · S/β
#
# 2(N-1) sequential send-receive steps each pay a start-up α; every rank sends 2(N-1)/N·S bytes at the
# per-direction bandwidth β. the tensor-parallel notes §2.2 writes the latency term as (N-1)·latency: that is one phase
# (reduce-scatter or all-gather alone); all-reduce runs both phases back to back, so 2(N-1) is right.
#
# Fit JSON schema ("ringlab.alphabeta/1"), one entry per algorithm:
#
#     {"schema": "ringlab.alphabeta/1",
#      "model": "T = 2(N-1)*alpha_s + 2(N-1)/N*S/beta_Bps",
#      "meta": {... run_metadata of the sweep: date, host, mpi, command, backend ...},
#      "fits": [{"algo": "ring", "collective": "allreduce",
#                "alpha_s": 2.1e-05,            # per-step latency, seconds
#                "beta_Bps": 3.2e+09,           # per-direction bandwidth, bytes/second (busbw units)
#                "nranks": [2, 3, 4], "sizes_bytes": [1024, 4096], "dtype": "float32",
#                "n_samples": 6, "weighting": "relative",
#                "rel_rms_error": 0.08, "max_rel_error": 0.2,   # of the model against the samples
#                "seed_form_latency_s": 4.2e-05,  # the (N-1)*latency of the tensor-parallel notes fitted to the same data = 2*alpha_s
#                "step_latency_s": 1.9e-05,       # one measured ring step at the smallest size, or null
#                "machine": {"host": ..., "backend": "numpy"|"cupy", "device": ..., "mpi": ...},
#                "date": "2025-...Z"}]}

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["ring_allreduce_time", "seed_allreduce_time", "fit_alpha_beta", "AlphaBetaFit", "samples_from_rows",
           "format_fit_report", "write_fits", "load_fit", "ring_step_variant", "SCHEMA", "MODEL_TEXT"]

SCHEMA = "ringlab.alphabeta/1"
MODEL_TEXT = "T = 2(N-1)*alpha_s + 2(N-1)/N*S/beta_Bps"


def ring_allreduce_time(size, nranks, alpha, beta):
    """Ring all-reduce time in seconds for ``size`` bytes on ``nranks`` ranks (α in s, β in B/s)."""
    n = np.asarray(nranks, dtype=float)
    return 2 * (n - 1) * alpha + 2 * (n - 1) / n * np.asarray(size, dtype=float) / beta


def seed_allreduce_time(size, nranks, latency, bandwidth):
    """the tensor-parallel notes §2.2's formula, T = 2(N-1)/N·S/B + (N-1)·latency (its latency term counts one phase)."""
    n = np.asarray(nranks, dtype=float)
    return 2 * (n - 1) / n * np.asarray(size, dtype=float) / bandwidth + (n - 1) * latency


@dataclass
class AlphaBetaFit:
    """A fitted α-β model for one algorithm; ``predict(size, nranks)`` gives seconds."""
    algo: str
    alpha_s: float
    beta_Bps: float
    nranks: list
    sizes_bytes: list
    n_samples: int
    rel_rms_error: float
    max_rel_error: float
    weighting: str = "relative"
    collective: str = "allreduce"
    dtype: str = ""
    seed_form_latency_s: float = math.nan
    step_latency_s: float = None
    machine: dict = field(default_factory=dict)
    date: str = ""

    def predict(self, size, nranks):
        return ring_allreduce_time(size, nranks, self.alpha_s, self.beta_Bps)


def _design(sizes, nranks):
    """Columns multiplying α and 1/β in T(S, N)."""
    n = np.asarray(nranks, dtype=float)
    return np.column_stack([2 * (n - 1), 2 * (n - 1) / n * np.asarray(sizes, dtype=float)])


def fit_alpha_beta(samples, weighting="relative"):
    """Least-squares α (s) and β (B/s) from ``samples`` = [(size_bytes, nranks, seconds), ...].

    ``weighting="relative"`` minimises the sum of squared *relative* errors, so 4 KiB and 64 MiB
    points count alike (plain least squares on seconds would let the largest message decide α too);
    ``"absolute"`` minimises squared seconds. Both parameters are kept non-negative.
    """
    data = [(float(s), int(n), float(t)) for s, n, t in samples if n >= 2 and t > 0 and s >= 0]
    if len(data) < 2:
        raise ValueError(f"need at least 2 timed samples with N >= 2 to fit alpha and beta, got {len(data)}")
    if weighting not in ("relative", "absolute"):
        raise ValueError(f"weighting must be 'relative' or 'absolute', got {weighting!r}")
    sizes, nranks, times = (np.array(col) for col in zip(*data))
    a = _design(sizes, nranks)
    w = 1 / times if weighting == "relative" else np.ones_like(times)
    aw, bw = a * w[:, None], times * w
    if np.linalg.matrix_rank(aw) < 2:
        raise ValueError("the samples cannot separate alpha from beta: vary the message size (or N)")
    x, *_ = np.linalg.lstsq(aw, bw, rcond=None)
    if x[0] < 0 or x[1] <= 0:
        # A boundary solution: fit one parameter with the other at zero, keep the better one.
        cands = []
        for j in (0, 1):
            col = aw[:, j]
            coef = max(float(col @ bw / (col @ col)), 0.0)
            guess = np.zeros(2)
            guess[j] = coef
            cands.append((float(np.sum((aw @ guess - bw) ** 2)), guess))
        x = min(cands, key=lambda c: c[0])[1]
    if x[1] <= 0:
        raise ValueError("no bandwidth term in the data (times do not grow with size): use larger messages")
    alpha, beta = float(x[0]), float(1 / x[1])
    rel = (ring_allreduce_time(sizes, nranks, alpha, beta) - times) / times
    return AlphaBetaFit(algo="", alpha_s=alpha, beta_Bps=beta, nranks=sorted({int(n) for n in nranks}),
                        sizes_bytes=sorted({int(s) for s in sizes}), n_samples=len(data),
                        rel_rms_error=float(np.sqrt(np.mean(rel ** 2))), max_rel_error=float(np.max(np.abs(rel))),
                        weighting=weighting, seed_form_latency_s=2 * alpha)


def _get(row, key):
    return row[key] if isinstance(row, dict) else getattr(row, key)


def samples_from_rows(rows, variant):
    """(size, nranks, seconds) of ``variant``'s timed, correct rows (bench.Row objects or JSON dicts)."""
    out = []
    for r in rows:
        t = _get(r, "time_us")
        if _get(r, "variant") != variant or t is None or not math.isfinite(t) or _get(r, "wrong") != 0:
            continue
        if _get(r, "nranks") >= 2 and _get(r, "size") > 0:
            out.append((_get(r, "size"), _get(r, "nranks"), t * 1e-6))
    return out


def format_fit_report(fit, samples):
    """The fit, then every measurement beside the model's prediction and the seed formula's.

    The seed column uses the seed's (N-1)·latency with latency = the fitted per-step α: the gap to the
    measurement at small sizes is the missing (N-1)·α of the second phase.
    """
    lines = [f"# alpha-beta fit for {fit.algo or 'ring'} ({fit.collective}): {MODEL_TEXT}",
             f"#   alpha = {fit.alpha_s * 1e6:.2f} us per step, beta = {fit.beta_Bps / 1e9:.3f} GB/s "
             f"({fit.n_samples} samples, N = {fit.nranks}, {fit.weighting} least squares; "
             f"model error rms {fit.rel_rms_error * 100:.1f}%, max {fit.max_rel_error * 100:.1f}%)"]
    if fit.step_latency_s is not None:
        lines.append(f"#   one ring step measured alone at the smallest size: {fit.step_latency_s * 1e6:.2f} us "
                     f"(compare alpha)")
    lines.append(f"#   the tensor-parallel notes form T = 2(N-1)/N*S/B + (N-1)*latency fits the same data only with latency = "
                 f"{fit.seed_form_latency_s * 1e6:.2f} us = 2*alpha: the ring has 2(N-1) sequential steps "
                 f"(N-1 reduce-scatter + N-1 all-gather), the seed counts N-1")
    lines.append(f"#{'N':>3s} {'size (B)':>12s} {'measured':>12s} {'model':>12s} {'err':>7s} "
                 f"{'seed(lat=a)':>12s} {'err':>7s}")
    lines.append(f"#{'':>3s} {'':>12s} {'(us)':>12s} {'(us)':>12s} {'(%)':>7s} {'(us)':>12s} {'(%)':>7s}")
    for size, n, t in sorted(samples, key=lambda s: (s[1], s[0])):
        model = float(fit.predict(size, n))
        seed = float(seed_allreduce_time(size, n, fit.alpha_s, fit.beta_Bps))
        lines.append(f" {n:>3d} {int(size):>12d} {t * 1e6:12.1f} {model * 1e6:12.1f} {(model - t) / t * 100:7.1f} "
                     f"{seed * 1e6:12.1f} {(seed - t) / t * 100:7.1f}")
    return "\n".join(lines)


def write_fits(path, fits, meta):
    """Persist fits as ringlab.alphabeta/1 JSON (schema in this module's docstring)."""
    doc = {"schema": SCHEMA, "model": MODEL_TEXT, "meta": meta, "fits": [asdict(f) for f in fits]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def load_fit(path, algo="ring"):
    """The AlphaBetaFit for ``algo`` from a ringlab.alphabeta/1 file."""
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a {SCHEMA} file (schema = {doc.get('schema')!r})")
    for entry in doc["fits"]:
        if entry["algo"] == algo:
            known = AlphaBetaFit.__dataclass_fields__
            return AlphaBetaFit(**{k: v for k, v in entry.items() if k in known})
    raise KeyError(f"{path} has no fit for algo {algo!r}; it has {[e['algo'] for e in doc['fits']]}")


def ring_step_variant(comm, name="ring-step"):
    """One ring step alone: Sendrecv of S/N bytes to rank+1 from rank-1 (host buffers).

    Timed at a tiny size it measures the per-step latency α directly, independently of the fit.
    """
    from mpi4py import MPI

    from ringlab.bench.harness import Case, Variant

    def prepare(count, dtype, op):
        n, r = comm.size, comm.rank
        chunk = max(count // n, 1)
        send = np.full(chunk, r, dtype=np.float32)
        recv = np.empty(chunk, dtype=np.float32)

        def run():
            comm.Sendrecv([send, MPI.FLOAT], (r + 1) % n, 17, [recv, MPI.FLOAT], (r - 1) % n, 17)
        return Case(run=run, wrong=lambda: int(np.count_nonzero(recv != (r - 1) % n)), nbytes=chunk * 4)
    return Variant(name, prepare, collective="sendrecv")
