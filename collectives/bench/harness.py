"""One timing and verification harness for every experiment (the nccl-tests recipe)."""
# For each size and variant: prepare buffers, run once and count wrong elements against an
# independent float64 reference (#wrong), warm up, time ``iters`` barrier-aligned iterations
# (device events on GPU), keep the slowest rank per iteration, report the median with
# algbw = S/t and busbw = algbw * factor(N), plus the ratio to a baseline variant.

import argparse
import json
import math
import platform
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
from mpi4py import MPI

__all__ = ["Case", "Unavailable", "Variant", "Row", "measure", "format_table", "busbw_factor",
           "pattern", "reference", "count_wrong", "tolerance", "write_json", "run_metadata", "sizes_from_range",
           "parse_size", "size_arg", "size_list_arg", "rss_kib", "require_gpu", "GPU_UNAVAILABLE_EXIT",
           "check_dtype_op"]

GPU_UNAVAILABLE_EXIT = 69     # sysexits.h EX_UNAVAILABLE

BUSBW_FACTORS = {
    "allreduce": lambda n: 2 * (n - 1) / n,       # 0 at N = 1, as in nccl-tests: no bytes cross a bus
    "reduce_scatter": lambda n: (n - 1) / n,
    "allgather": lambda n: (n - 1) / n,
    "broadcast": lambda n: 1.0,
    "sendrecv": lambda n: 1.0,
}


def busbw_factor(collective, nranks):
    """nccl-tests' bus-bandwidth factor: 2(N-1)/N for all-reduce, (N-1)/N for RS and AG."""
    return BUSBW_FACTORS[collective](nranks)


def require_gpu(script):
    """For GPU-only experiments: unless CuPy and a CUDA device are usable, say so in one line (rank 0
    only) and exit GPU_UNAVAILABLE_EXIT. Call it after argument parsing, so ``--help`` always works."""
    from ringlab.arrays import cupy_or_none
    if cupy_or_none() is not None:
        return
    if MPI.COMM_WORLD.rank == 0:
        sys.stderr.write(f"{script}: needs a CUDA GPU and CuPy (pip install 'ringlab[gpu]'); none is usable on this "
                         "machine, so there is nothing to measure\n")
        sys.stderr.flush()
    sys.exit(GPU_UNAVAILABLE_EXIT)


def check_dtype_op(parser, dtype, op):
    """Reject a dtype/op pair the collectives refuse (e.g. int32 with avg) before any MPI work: one line
    from rank 0 (``prog: error: ...``) and exit status 2 on every rank, as argparse does for bad flags."""
    from ringlab.ops import check_op_dtype
    try:
        check_op_dtype(op, dtype)
    except (TypeError, ValueError) as exc:
        if MPI.COMM_WORLD.rank == 0:
            sys.stderr.write(f"{parser.prog}: error: --dtype {dtype} --op {op}: {exc}\n")
            sys.stderr.flush()
        sys.exit(2)


class Unavailable(Exception):
    """A variant cannot run here (e.g. NCCL with ranks sharing a GPU); the reason is shown as n/a."""


@dataclass
class Case:
    """Prepared buffers for one (variant, size): ``run`` does one collective, ``wrong`` counts bad
    elements of its result on this rank, ``sync`` waits for device work. ``stream`` (a CuPy
    stream) switches timing to CUDA events. ``queued`` (single-process device cases): time ``queued``
    back-to-back runs queued behind a spin kernel and divide, so the time is the device's alone, not
    the host's launch overhead (what a run costs inside a busy stream)."""
    run: Callable[[], None]
    wrong: Callable[[], int]
    sync: Callable[[], None] = lambda: None
    stream: object = None
    nbytes: Optional[int] = None
    close: Callable[[], None] = lambda: None
    queued: int = 0


@dataclass
class Variant:
    """A named way to run the collective: ``prepare(count, dtype, op) -> Case`` or raise Unavailable."""
    name: str
    prepare: Callable[[int, str, str], Case]
    collective: str = "allreduce"


@dataclass
class Row:
    variant: str
    size: int
    count: int
    type: str
    redop: str
    time_us: float = math.nan
    algbw: float = math.nan
    busbw: float = math.nan
    wrong: int = -1
    ratio: float = math.nan
    nranks: int = 1
    times_us: list = field(default_factory=list)
    note: str = ""


def _now():
    return MPI.Wtime()


def rss_kib():
    """This process's resident set size in KiB (Linux /proc; 0 where that is unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


_SPIN = {}


def _spin(stream, seconds):
    """Enqueue a one-thread kernel that busy-waits ``seconds`` on the GPU's global timer; returns an
    event recorded after it (not done yet = the host finished enqueueing while the GPU still spun)."""
    import cupy
    if "k" not in _SPIN:
        _SPIN["k"] = cupy.RawKernel(r"""
extern "C" __global__ void ringlab_spin(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}""", "ringlab_spin")
    _SPIN["k"]((1,), (1,), (np.uint64(seconds * 1e9),), stream=stream)
    ev = cupy.cuda.Event(disable_timing=True)
    ev.record(stream)
    return ev


def _time_queued(case):
    """Device time of one run: ``case.queued`` runs enqueued behind a spin kernel (see Case)."""
    import cupy
    k = case.queued
    t0 = time.perf_counter()
    for _ in range(k):
        case.run()
    host = time.perf_counter() - t0
    case.sync()
    for _ in range(4):
        spun = _spin(case.stream, max(2e-3, 3 * host))
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(case.stream)
        t0 = time.perf_counter()
        for _ in range(k):
            case.run()
        host = time.perf_counter() - t0
        end.record(case.stream)
        still_spinning = not spun.done
        end.synchronize()
        if still_spinning:
            return cupy.cuda.get_elapsed_time(start, end) * 1e-3 / k
    raise RuntimeError("the host could not enqueue the timed runs while the GPU was busy; timing is not valid")


def _time_once(case, comm):
    comm.Barrier()
    if case.stream is not None and case.queued:
        return _time_queued(case)
    if case.stream is not None:
        import cupy
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(case.stream)
        case.run()
        end.record(case.stream)
        end.synchronize()
        case.sync()
        return cupy.cuda.get_elapsed_time(start, end) * 1e-3
    t0 = _now()
    case.run()
    case.sync()
    return _now() - t0


def measure(comm, variants, counts, dtype="float32", op="sum", iters=20, warmup=5, baseline=None,
            progress=None):
    """Check then time every variant at every count; returns a list of Row (same on all ranks).

    ``baseline`` names the variant the ratio column divides by (baseline time / variant time,
    so > 1 means faster than the baseline). ``progress(text)`` is called on rank 0 per row.
    """
    itemsize = np.dtype(dtype).itemsize if dtype != "bfloat16" else 2
    rows = []
    for count in counts:
        for v in variants:
            size = count * itemsize
            row = Row(v.name, size, count, dtype, op, nranks=comm.size)
            try:
                case = v.prepare(count, dtype, op)
                ok = 1
            except Unavailable as exc:
                case, ok, row.note = None, 0, f"n/a: {exc}"
            if comm.allreduce(ok, op=MPI.MIN) == 0:  # unavailable on any rank -> n/a on every rank
                if case is not None:
                    case.close()
                row.note = next((n for n in comm.allgather(row.note) if n), "n/a")
                rows.append(row)
                continue
            case.run()
            case.sync()
            row.wrong = int(comm.allreduce(int(case.wrong()), op=MPI.SUM))
            for _ in range(warmup):
                case.run()
            case.sync()
            local = np.array([_time_once(case, comm) for _ in range(iters)])
            slowest = np.empty_like(local)
            comm.Allreduce(local, slowest, op=MPI.MAX)
            case.close()
            row.times_us = [t * 1e6 for t in slowest]
            t = float(np.median(slowest))
            payload = case.nbytes if case.nbytes is not None else size
            row.time_us = t * 1e6
            row.algbw = payload / t / 1e9 if t > 0 else math.inf
            row.busbw = row.algbw * busbw_factor(v.collective, comm.size)
            rows.append(row)
            if progress is not None and comm.rank == 0:
                progress(f"{v.name:>16s} {size:>12d} B  {row.time_us:10.1f} us  #wrong {row.wrong}")
    if baseline is not None:
        base = {r.size: r.time_us for r in rows if r.variant == baseline}
        for r in rows:
            if r.size in base and not math.isnan(base[r.size]) and not math.isnan(r.time_us):
                r.ratio = base[r.size] / r.time_us
    return rows


def format_table(rows, title=""):
    """nccl-tests style table (one line per variant and size)."""
    head = (f"#{'variant':>15s} {'size':>12s} {'count':>12s} {'type':>9s} {'redop':>6s} "
            f"{'time':>10s} {'algbw':>8s} {'busbw':>8s} {'#wrong':>7s} {'ratio':>7s}\n"
            f"#{'':>15s} {'(B)':>12s} {'(elements)':>12s} {'':>9s} {'':>6s} "
            f"{'(us)':>10s} {'(GB/s)':>8s} {'(GB/s)':>8s} {'':>7s} {'':>7s}")
    lines = [f"# {title}"] if title else []
    lines.append(head)
    for r in rows:
        if r.note.startswith("n/a"):
            lines.append(f" {r.variant:>15s} {r.size:>12d} {r.count:>12d} {r.type:>9s} {r.redop:>6s}   {r.note}")
            continue
        ratio = f"{r.ratio:7.2f}" if not math.isnan(r.ratio) else f"{'-':>7s}"
        lines.append(f" {r.variant:>15s} {r.size:>12d} {r.count:>12d} {r.type:>9s} {r.redop:>6s} "
                     f"{r.time_us:10.1f} {r.algbw:8.3f} {r.busbw:8.3f} {r.wrong:>7d} {ratio}")
    return "\n".join(lines)


# ---- deterministic data with an exact, independent reference ------------------------------------

def pattern(count, dtype, rank, op="sum", xp=np):
    """Rank ``rank``'s input: small integers (exact in every dtype, never all zeros); ±1 for prod."""
    i = xp.arange(count, dtype=xp.int64)
    if op == "prod":
        v = 1 - 2 * ((i * 3 + rank * 5) % 2)
    else:
        v = ((i * 7 + rank * 13 + 1) % 9) - 4
    return _cast(v, dtype, xp)


def _cast(v, dtype, xp):
    if dtype == "bfloat16" and xp is np:
        from ml_dtypes import bfloat16
        return v.astype(bfloat16)
    return v.astype(dtype)


def reference(count, nranks, op="sum", xp=np):
    """float64 result of ``op`` over every rank's ``pattern`` (recomputed, not communicated)."""
    acc = None
    for r in range(nranks):
        v = pattern(count, "float64", r, op, xp)
        if acc is None:
            acc = v.copy()
        elif op in ("sum", "avg"):
            acc += v
        elif op == "prod":
            acc *= v
        elif op == "max":
            acc = xp.maximum(acc, v)
        elif op == "min":
            acc = xp.minimum(acc, v)
    if acc is None:
        acc = xp.zeros(count)
    return acc / nranks if op == "avg" else acc


def tolerance(dtype, op, nranks):
    """Relative tolerance: exact for integer-valued data, rounding of one division for avg."""
    if op != "avg":
        return 0.0
    eps = {"float16": 2 ** -10, "bfloat16": 2 ** -7, "float32": 2 ** -23, "float64": 2 ** -52}.get(str(dtype), 0.0)
    return 2 * eps


def count_wrong(out, ref, dtype, op, nranks, xp=np):
    """Elements of ``out`` outside the tolerance of ``ref`` (NaN always counts as wrong)."""
    got = out.reshape(-1).astype(xp.float64)
    rtol = tolerance(dtype, op, nranks)
    bad = ~(xp.abs(got - ref) <= rtol * xp.abs(ref))
    return int(bad.sum())


def parse_size(text):
    """'64M' -> 67108864 bytes (K, M, G are powers of 1024)."""
    text = text.strip().upper().rstrip("B")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in "KMG" else text
    try:
        value = int(float(number) * mult)
    except ValueError:
        raise ValueError(f"bad size {text!r}: use e.g. 4K, 1M, 64M") from None
    if value < 0:
        raise ValueError("sizes must be >= 0")
    return value


def size_arg(text):
    """``parse_size`` as an argparse ``type=``: a bad size becomes a usage error with the reason."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def size_list_arg(text):
    """'4K,1M,16M' -> [4096, 1048576, 16777216], as an argparse ``type=`` (usage error if bad)."""
    return [size_arg(s) for s in text.split(",") if s.strip()]


def sizes_from_range(begin, end, factor, itemsize):
    """Element counts for byte sizes begin, begin*factor, ... <= end (nccl-tests -b/-e/-f)."""
    counts, size = [], int(begin)
    while size <= int(end):
        counts.append(max(size // itemsize, 0))
        size = int(size * factor) if factor > 1 else size + 1
    return counts


def run_metadata(comm, **extra):
    """What produced a result: date, host, MPI library, N, Python, the command line."""
    meta = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "nranks": comm.size,
        "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        "python": platform.python_version(),
        "command": "mpirun -n %d python %s" % (comm.size, shlex.join(sys.argv)),
    }
    meta.update(extra)
    return meta


def write_json(path, rows, meta):
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [asdict(r) for r in rows]}, f, indent=1)
