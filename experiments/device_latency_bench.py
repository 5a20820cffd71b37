"""Small-message latency on the device: one-shot, two-shot, device ring and auto, 8 B - 256 KB fp32 sum.

    mpirun -n 8 python experiments/device_latency_bench.py --json out.json      # (start MPS first for per-rank)
    mpirun -n 8 python experiments/device_latency_bench.py --write-tuning ~/.cache/ringlab/tuning.json

Every row is checked (#wrong) before it is timed. Three times per row, medians over rounds, slowest rank:
``single``: one barrier-aligned call (CUDA events), ``loop``: wall time per call of back-to-back calls (as
nccl-tests), ``graph``: device time per call of calls replayed from one CUDA graph (no host launch per call).
The mode (per-rank kernels or fallback) is recorded per row.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ALL = ("oneshot", "twoshot", "ring", "auto")


def parse(argv=None):
    from ringlab.bench.harness import size_list_arg
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size_list_arg, default=size_list_arg("8,64,512,4K,16K,64K,256K"))
    p.add_argument("--variants", default=",".join(ALL), help="subset of %(default)s")
    p.add_argument("--mode", default="auto", help="one-shot/two-shot mode: auto (probe), per-rank, fallback")
    p.add_argument("--iters", type=int, default=50, help="single-call samples per row")
    p.add_argument("--loop", type=int, default=200, help="back-to-back calls per loop round")
    p.add_argument("--rounds", type=int, default=7, help="loop rounds per row")
    p.add_argument("--graph", type=int, default=50, help="calls captured in one CUDA graph per replay (0: none)")
    p.add_argument("--trace", type=int, default=20, help="traced one-shot/two-shot calls of the smallest size, for "
                   "where a call's time goes on the GPU's clock (0: none)")
    p.add_argument("--json", default=None, help="write rows and metadata here")
    p.add_argument("--write-tuning", default=None, metavar="PATH",
                   help="merge the measured crossovers into this tuning file (the auto table)")
    args = p.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v and v not in ALL]
    if bad:
        p.error(f"unknown variants {bad}; choose from {', '.join(ALL)}")
    return args


def executors(comm, names, mode):
    """name -> (object with allreduce(src, out, op)/synchronize(), mode label)."""
    from ringlab.gpu.device_ring import get_device_ring
    from ringlab.gpu.device_small import DeviceSmallAllreduce
    out = {}
    for a in ("oneshot", "twoshot"):
        if a in names or "auto" in names:
            e = DeviceSmallAllreduce(comm, a, mode=mode)
            out[a] = (e, e.mode, e.mode_why)
    if "ring" in names or "auto" in names:
        r = get_device_ring(comm)
        out["ring"] = (r, r.mode, r.mode_why)
    return out


def variant(comm, name, execs, table):
    from ringlab.bench.harness import Case, Variant, count_wrong, pattern, reference
    from ringlab.gpu.device_small import choose_device_algorithm

    def prepare(count, dtype, op):
        import cupy
        pick = choose_device_algorithm(count * 4, comm.size, table) if name == "auto" else name
        ex = execs[pick][0]
        x, ref = pattern(count, dtype, comm.rank, op, cupy), reference(count, comm.size, op, cupy)
        y = cupy.empty_like(x)
        case = Case(run=lambda: ex.allreduce(x, y, op), wrong=lambda: count_wrong(y, ref, dtype, op, comm.size, cupy),
                    sync=ex.synchronize, stream=cupy.cuda.get_current_stream())
        case.pick = pick
        return case
    return Variant(name, prepare)


def loop_time(comm, case, calls, rounds):
    """(median wall us per call of ``calls`` back-to-back calls, median host us per call to enqueue them)."""
    per, host = [], []
    for _ in range(rounds):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            case.run()
        t1 = time.perf_counter()
        case.sync()
        t2 = time.perf_counter()
        per.append(comm.allreduce((t2 - t0) / calls, op=max_op()))
        host.append(comm.allreduce((t1 - t0) / calls, op=max_op()))
    return float(np.median(per)) * 1e6, float(np.median(host)) * 1e6


def graph_time(comm, variant, count, calls, rounds):
    """Median device us per call of ``calls`` calls captured in one CUDA graph and replayed (no host launch per
    call: what the GPU itself needs per call), slowest rank; NaN with the reason if the capture fails."""
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        case = variant.prepare(count, "float32", "sum")
        try:
            case.run()
            stream.synchronize()
            stream.begin_capture()
            for _ in range(calls):
                case.run()
            graph = stream.end_capture()
        except Exception as exc:  # noqa: BLE001 - reported in the row, the run goes on
            return float("nan"), f"{type(exc).__name__}: {exc}"
        times = []
        for _ in range(rounds):
            comm.Barrier()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(comm.allreduce(cupy.cuda.get_elapsed_time(start, end) * 1e3 / calls, op=max_op()))
        wrong = comm.allreduce(int(case.wrong()), op=max_op())
    return float(np.median(times)), "" if wrong == 0 else f"#wrong {wrong} after replay"


def trace_breakdown(comm, ex, count, calls):
    """Medians over ``calls`` barrier-aligned traced calls, in us on the GPU's clock (%globaltimer, one clock for
    every rank): start skew (last start - first), then from the last rank's start: inputs ready, reduced, exit
    (the slowest rank); and the kernel's own span (start to exit, the slowest rank)."""
    import cupy
    x = cupy.ones(count, cupy.float32)
    y = cupy.empty_like(x)
    ex.traced_call(x, y, "sum")
    rows = []
    for _ in range(calls):
        comm.Barrier()
        t = [int(v) for v in ex.traced_call(x, y, "sum")]
        every = comm.allgather(t)
        last = max(r[0] for r in every)
        rows.append([last - min(r[0] for r in every)] + [max(r[k] for r in every) - last if all(r[k] for r in every)
                                                         else float("nan") for k in (1, 2, 3)] +
                    [max(r[3] - r[0] for r in every)])
    med = np.nanmedian(np.array(rows, float), axis=0) / 1e3
    return dict(zip(("start_skew", "inputs_ready", "reduced", "exit", "kernel_span"), (round(float(v), 2) for v in med)))


def null_graph_time(comm, calls, rounds):
    """Device us per call of ``calls`` one-element copies replayed from one CUDA graph, every rank at once: what a
    kernel boundary costs here with this many ranks' contexts sharing the GPU (no flags, no peers)."""
    import cupy
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.ones(2, cupy.float32)
        y = cupy.empty_like(x)
        y[...] = x
        stream.synchronize()
        stream.begin_capture()
        for _ in range(calls):
            y[...] = x
        graph = stream.end_capture()
        times = []
        for _ in range(rounds):
            comm.Barrier()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            times.append(comm.allreduce(cupy.cuda.get_elapsed_time(start, end) * 1e3 / calls, op=max_op()))
    return float(np.median(times))


def max_op():
    from mpi4py import MPI
    return MPI.MAX


def write_tuning(path, n, crossovers, points, meta):
    """Merge ``device[N]`` into the tuning file (the host tuner's ``fits`` are kept)."""
    try:
        with open(path) as f:
            table = json.load(f)
    except (OSError, ValueError):
        table = {}
    table.setdefault("version", 1)
    table.setdefault("fits", {})
    table.setdefault("device", {})[str(n)] = dict(crossovers, points=points, meta=meta)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


def main(argv=None):
    args = parse(argv)
    from mpi4py import MPI
    from ringlab.bench.harness import require_gpu
    require_gpu("device_latency_bench.py")
    from ringlab.arrays import use_local_gpu
    from ringlab.bench.harness import format_table, measure, run_metadata, write_json
    from ringlab.gpu.device_ring import mps_visible
    from ringlab.gpu.device_small import crossovers_from_rows, default_crossovers, load_device_table
    comm = MPI.COMM_WORLD
    use_local_gpu(comm)
    names = [v for v in args.variants.split(",") if v]
    execs = executors(comm, names, args.mode)
    table = comm.bcast(load_device_table() if comm.rank == 0 else None, root=0)
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    for k, (_, mode, why) in execs.items():
        say(f"{k}: mode {mode} ({why})", flush=True)
    say(f"MPS pipe visible: {mps_visible()}; auto table: {'tuning file' if table else 'default crossovers'}", flush=True)
    variants = [variant(comm, v, execs, table) for v in names]
    counts = [max(s // 4, 1) for s in args.sizes]
    rows = measure(comm, variants, counts, iters=args.iters, warmup=5, progress=print)
    loops = {}
    for v in variants:                         # the back-to-back loop, per row
        for count in counts:
            case = v.prepare(count, "float32", "sum")
            case.run(), case.sync()
            loops[(v.name, count)] = loop_time(comm, case, args.loop, args.rounds) + (case.pick,)
    graphs = {}
    for v in variants if args.graph else ():   # the same calls replayed from one CUDA graph
        for count in counts:
            graphs[(v.name, count)] = graph_time(comm, v, count, args.graph, args.rounds)
    traces = {a: trace_breakdown(comm, execs[a][0], counts[0], args.trace) for a in ("oneshot", "twoshot")
              if args.trace and a in execs and execs[a][1] == "per-rank"}
    null_us = null_graph_time(comm, args.graph, args.rounds) if args.graph else float("nan")
    for r in rows:
        per, host, pick = loops[(r.variant, r.count)]
        r.note = f"pick={pick} mode={execs[pick][1]} loop_us={per:.2f} host_us={host:.2f}"
    single = {a: {r.size: r.time_us for r in rows if r.variant == a and r.wrong == 0}
              for a in ("oneshot", "twoshot", "ring") if a in names}
    cross = crossovers_from_rows(single, beyond=default_crossovers(comm.size)["twoshot_max_bytes"]) \
        if len(single) == 3 else None
    meta = run_metadata(comm, modes={k: [m, w] for k, (_, m, w) in execs.items()}, mps_visible=mps_visible(),
                        loop_calls=args.loop, rounds=args.rounds, iters=args.iters, crossovers=cross,
                        loop_us={f"{k[0]}/{k[1] * 4}": v[0] for k, v in loops.items()},
                        host_us_per_call={f"{k[0]}/{k[1] * 4}": v[1] for k, v in loops.items()},
                        graph_calls=args.graph, graph_us={f"{k[0]}/{k[1] * 4}": v[0] for k, v in graphs.items()},
                        graph_notes={f"{k[0]}/{k[1] * 4}": v[1] for k, v in graphs.items() if v[1]},
                        trace_us={"bytes": counts[0] * 4, **traces}, null_graph_us=null_us)
    if comm.rank == 0:
        if args.json:
            write_json(args.json, rows, meta)
        if args.write_tuning and cross is not None:
            write_tuning(args.write_tuning, comm.size, cross,
                         {a: [[int(s), round(t, 2)] for s, t in sorted(v.items())] for a, v in single.items()},
                         {"date": meta["date"], "command": meta["command"], "modes": meta["modes"]})
            print(f"wrote device crossovers {cross} for N={comm.size} into {args.write_tuning}")
        print(format_table(rows, f"single barrier-aligned call, {comm.size} ranks (median of {args.iters})"))
        print(f"\n# {comm.size} ranks, fp32 sum: median us per call (single = one aligned call, "
              f"loop = back-to-back), #wrong summed over ranks; crossovers {cross}")
        print(f"#{'size (B)':>9s} " + " ".join(f"{v + ' single':>15s} {'loop':>7s} {'graph':>7s} {'mode':>14s}"
                                                for v in names) +
              f" {'auto pick':>10s}")
        for count in counts:
            cells, pick = [], ""
            for v in names:
                r = next(r for r in rows if r.variant == v and r.count == count)
                per, _, p = loops[(v, count)]
                mode = execs[p][1]
                g = graphs.get((v, count), (float("nan"), ""))[0]
                cells.append(f"{r.time_us:15.1f} {per:7.1f} {g:7.1f} {mode + ('' if r.wrong == 0 else ' WRONG'):>14s}")
                pick = p if v == "auto" else pick
            print(f" {count * 4:>9d} " + " ".join(cells) + f" {pick:>10s}")
        for a, t in traces.items():
            print(f"# {a} {counts[0] * 4} B on the GPU clock (median of {args.trace} traced calls, us): " +
                  ", ".join(f"{k} {v}" for k, v in t.items()))
        print(f"# a one-element copy kernel replayed from a graph on every rank at once: {null_us:.1f} us per call")
    for k, (e, _, _) in execs.items():
        if k != "ring":
            e.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
