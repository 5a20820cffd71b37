"""Device ring vs today's GPU paths: latency 8 B - 256 KB, 64/256 MB vs the HBM floor, host Python per call.

    mpirun -n 8 python experiments/device_ring_bench.py --json out.json      # (start MPS first for per-rank)
    python experiments/device_ring_bench.py --plot-timeline out.json timeline.png

Every row is checked (#wrong) before it is timed; the device ring's mode (per-rank kernels or the
single-context fallback) and whether an MPS pipe is visible are recorded with the results.
"""
import argparse
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.arrays import use_local_gpu  # noqa: E402
from ringlab.bench.harness import (Case, Variant, count_wrong, format_table, measure, pattern, reference,  # noqa: E402
                                   require_gpu, run_metadata, size_list_arg, write_json)
from ringlab.bench.variants import allreduce_variant  # noqa: E402
from ringlab.gpu.device_ring import DeviceRing, mps_visible  # noqa: E402
from experiments.gpu_datapath import copy_bandwidth  # noqa: E402


def device_ring_variant(comm, ring, name=None):
    def prepare(count, dtype, op):
        import cupy
        x, ref = pattern(count, dtype, comm.rank, op, cupy), reference(count, comm.size, op, cupy)
        y = cupy.empty_like(x)
        return Case(run=lambda: ring.allreduce(x, y, op), wrong=lambda: count_wrong(y, ref, dtype, op, comm.size, cupy),
                    sync=ring.synchronize, stream=cupy.cuda.get_current_stream())
    return Variant(name or f"device-ring/{ring.mode}", prepare)


def loop_latency(comm, variants, counts, calls=50, rounds=5):
    """nccl-tests' timing: ``calls`` back-to-back calls between two events after a barrier, per call, slowest
    rank, median of ``rounds``. {variant: {bytes: us}}; every case is checked first (AssertionError if wrong)."""
    import cupy
    out = {}
    for v in variants:
        out[v.name] = {}
        for count in counts:
            case = v.prepare(count, "float32", "sum")
            case.run(), case.sync()
            wrong = int(comm.allreduce(int(case.wrong()), op=MPI.SUM))
            assert wrong == 0, f"{v.name} {count * 4} B: #wrong {wrong}"
            times = []
            for _ in range(rounds):
                comm.Barrier()
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record(case.stream)
                for _ in range(calls):
                    case.run()
                end.record(case.stream)
                end.synchronize()
                case.sync()
                times.append(comm.allreduce(cupy.cuda.get_elapsed_time(start, end) * 1e3 / calls, op=MPI.MAX))
            case.close()
            out[v.name][count * 4] = float(np.median(times))
    return out


def shape_arg(text):
    """'768x1r80s64g1k32' -> DeviceRing keywords (threads, blocks_per_sm, max_registers (r0: none), slice_bytes
    in KB, group: slices per group of the walk, max_slices)."""
    import re
    m = re.fullmatch(r"(\d+)x(\d+)(?:r(\d+))?(?:s(\d+))?(?:g(\d+))?(?:k(\d+))?", text)
    if m is None:
        raise ValueError(f"bad launch shape {text!r}; expected THREADSxBLOCKS[rREGS][sSLICE_KB][gGROUP][kMAX_SLICES]")
    kw = {"threads": int(m[1]), "blocks_per_sm": int(m[2])}
    if m[3] is not None:
        kw["max_registers"] = int(m[3]) or None
    if m[4] is not None:
        kw["slice_bytes"] = int(m[4]) << 10
    if m[5] is not None:
        kw["group"] = int(m[5])
    if m[6] is not None:
        kw["max_slices"] = int(m[6])
    return kw


def ring_shape(ring):
    """Launch shape of a device ring's fp32-sum kernel (threads, max blocks per rank, registers per thread)."""
    import cupy
    if ring.fallback is not None:
        return {}
    fast = ring._launchers.get((cupy.dtype("float32"), "sum")) or ring._launcher(cupy.dtype("float32"), "sum")
    return {"threads": fast.threads, "max_parts": fast.max_parts, "registers": fast.attribute("NUM_REGS"),
            "local_bytes": fast.attribute("LOCAL_SIZE_BYTES"), "stage_bytes": ring.stage_bytes, "scope": ring.scope,
            "slice_bytes": ring.slice_bytes}


def host_per_call(comm, variant, latency_s):
    """Median over 5 rounds of the host seconds one call takes to return (small message, back to back)."""
    calls = int(comm.bcast(max(5, min(200, 0.2 / max(latency_s, 1e-6))), root=0))
    case = variant.prepare(2, "float32", "sum")
    case.run(), case.sync()
    rounds = []
    for _ in range(5):
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(calls):
            case.run()
        rounds.append((time.perf_counter() - t0) / calls)
        case.sync()
    case.close()
    return float(np.median(rounds))


def host_breakdown(comm, ring, calls=300):
    """Host microseconds per call of the device ring's pieces (small message, back to back, median of 5)."""
    import cupy
    x = cupy.ones(2, cupy.float32)
    y = cupy.empty_like(x)
    pieces = {"export src+out": lambda: (ring.peers.export(x), ring.peers.export(y)),
              "swap with neighbours": lambda: ring._swap_with_neighbours(x, y),
              "whole call": lambda: ring.allreduce(x, y)}
    out = {}
    for name, fn in pieces.items():
        fn()
        rounds = []
        for _ in range(5):
            comm.Barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            rounds.append((time.perf_counter() - t0) / calls * 1e6)
        ring.synchronize()
        out[name] = float(np.median(rounds))
    if os.environ.get("DEVICE_RING_PROFILE") == "1":         # where a call's host time goes (rank 0 prints)
        import cProfile
        import pstats
        prof = cProfile.Profile()
        comm.Barrier()
        prof.runcall(lambda: [ring.allreduce(x, y) for _ in range(calls)])
        ring.synchronize()
        if comm.rank == 0:
            pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    return out


def timeline(comm, ring, count, calls=5):
    """globaltimer traces (ns) of one traced call per rank: start, end of each primitive, exit."""
    import cupy
    x = cupy.ones(count, cupy.float32)
    y = cupy.empty_like(x)
    ring.trace_enabled = True
    for _ in range(calls):
        comm.Barrier()
        ring.allreduce(x, y)
        ring.synchronize()
    ring.trace_enabled = False
    assert bool((y == comm.size).all()), "traced call gave a wrong result"
    return comm.gather([int(t) for t in ring.last_trace()], root=0)


def plot_timeline(json_path, png_path):
    """Every rank's primitives on the GPU's clock (from a run's traces_ns), one panel per message size."""
    import json

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from ringlab.primitives import ring_allreduce_program
    traces = json.load(open(json_path))["meta"]["traces_ns"]
    colors = {"recv_reduce_send": "tab:blue", "recv_reduce_copy_send": "tab:purple", "recv_copy_send": "tab:green",
              "recv": "tab:olive", "wait for right": "lightgray"}
    fig, axes = plt.subplots(len(traces), 1, figsize=(10, 2.2 + 1.6 * len(traces)), squeeze=False)
    seen = set()
    for ax, (size, tr) in zip(axes[:, 0], traces.items()):
        n = len(tr)
        t0 = min(t[0] for t in tr)
        for r, t in enumerate(tr):
            kinds = [p.kind for p in ring_allreduce_program(r, n)][1:] + ["wait for right"]
            for i, kind in enumerate(kinds):
                a, b = (t[i] - t0) / 1e3, (t[i + 1] - t0) / 1e3
                ax.barh(r, b - a, left=a, color=colors[kind], edgecolor="white", linewidth=0.5,
                        label=None if kind in seen else kind)
                seen.add(kind)
            ax.plot([(t[0] - t0) / 1e3], [r], "k|", markersize=12)
        ax.set_yticks(range(n), [f"rank {r}" for r in range(n)])
        ax.invert_yaxis()
        ax.set_xlabel("us on the GPU's %globaltimer (| = kernel start)")
        ax.set_title(f"{int(size)} B all-reduce, {n} ranks on one H200 under MPS: one persistent kernel per rank")
    fig.legend(loc="lower center", fontsize=8, ncol=5)
    fig.subplots_adjust(bottom=0.16)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(png_path, dpi=120)


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--plot-timeline":      # from a committed run, no GPU needed
        return plot_timeline(sys.argv[2], sys.argv[3])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size_list_arg, default=size_list_arg("8,64,512,4K,16K,64K,256K"))
    p.add_argument("--large", type=size_list_arg, default=size_list_arg("64M,256M"))
    p.add_argument("--variants", default="ipc-shared,ipc,oneshot,twoshot", help="today's paths beside the device ring")
    p.add_argument("--large-variants", default="ipc-shared,ipc")
    p.add_argument("--mode", default="auto", help="device ring mode: auto, per-rank, single-context")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--loop", type=int, default=50, help="back-to-back calls per timed round (nccl-tests style)")
    p.add_argument("--shapes", default="512x1r0s256,768x1s256,768x1s1024", help="large-message launch shapes "
                   "THREADSxBLOCKS_PER_SM[rMAX_REGISTERS][sSLICE_KB] tried beside the default (r0: no register cap)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    require_gpu("device_ring_bench.py")
    comm = MPI.COMM_WORLD
    use_local_gpu(comm)
    ring = DeviceRing(comm, mode=args.mode)
    if comm.rank == 0:
        print(f"device ring mode: {ring.mode} ({ring.mode_why}); MPS pipe visible: {mps_visible()}", flush=True)

    def today(name):
        if name in ("oneshot", "twoshot"):
            return allreduce_variant(comm, name, algo=name, device=True)
        return allreduce_variant(comm, name, algo="ring", device=True, transport=name)

    shapes = {"default": ring_shape(ring)}
    counts = [s // 4 or 1 for s in args.sizes]
    small = [device_ring_variant(comm, ring)] + [today(v) for v in args.variants.split(",") if v]
    zero_copy = sys_scope = None
    others = []
    mine = 1
    if ring.mode == "per-rank":      # the same ring without the staging buffer (a handle swap per call), sys flags
        zero_copy = DeviceRing(comm, mode="per-rank", stage_bytes=0)
        sys_scope = DeviceRing(comm, mode="per-rank", scope="sys")
        small[1:1] = [allreduce_variant(comm, "api transport=device", algo="ring", device=True, transport="device"),
                      device_ring_variant(comm, zero_copy, "device-ring/zero-copy"),
                      device_ring_variant(comm, sys_scope, f"device-ring/{sys_scope.scope}-scope")]
        for name, kw in (("split", {"stage_split": True}), ("throttled", {"max_in_flight": 2}),
                         ("split+throttled", {"stage_split": True, "max_in_flight": 2})):
            others.append(DeviceRing(comm, mode="per-rank", **kw))
            small.insert(len(others) + 3, device_ring_variant(comm, others[-1], f"device-ring/staged-{name}"))
        mine = len(others) + 4
    shapes["sys-scope"] = ring_shape(sys_scope) if sys_scope is not None else {}
    rows = measure(comm, small, counts, iters=args.iters, warmup=5, baseline=small[0].name, progress=print)
    loops = loop_latency(comm, small[:mine], counts, calls=args.loop)
    if comm.rank == 0:
        print("back-to-back (us/call):", {k: {b: round(t, 1) for b, t in v.items()} for k, v in loops.items()},
              flush=True)
    first = {r.variant: r.time_us * 1e-6 for r in rows if r.count == rows[0].count}
    host = {v.name: host_per_call(comm, v, first.get(v.name, 1e-3)) * 1e6 for v in small}
    parts = host_breakdown(comm, ring) if ring.mode == "per-rank" else {}
    if comm.rank == 0:
        print("host Python per call (us, median):", ", ".join(f"{k} {v:.1f}" for k, v in host.items()))
        print("device ring host pieces (us/call):", ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
    traces = {}
    if ring.mode == "per-rank":
        traces = {str(c * 4): timeline(comm, ring, c) for c in (1024, 16384)}
    large = [device_ring_variant(comm, ring)] + [today(v) for v in args.large_variants.split(",") if v]
    extra = []
    if ring.mode == "per-rank":
        for shape in [s for s in args.shapes.split(",") if s]:
            shape_kw = shape_arg(shape)
            other = DeviceRing(comm, mode="per-rank", **shape_kw)
            shapes[shape] = ring_shape(other)
            extra.append(other)
            large.append(device_ring_variant(comm, other, f"device-ring/{shape}"))
    if comm.rank == 0:
        print("launch shapes:", shapes, flush=True)
    big = measure(comm, large, [s // 4 for s in args.large], iters=max(5, args.iters // 3), warmup=2, progress=print)
    bw = comm.bcast(copy_bandwidth() if comm.rank == 0 else None, root=0)
    for r in big:
        floor_s = 5 * (comm.size - 1) * r.size / bw
        r.note = f"{100 * floor_s / (r.time_us * 1e-6):.1f}% of HBM floor" if r.time_us == r.time_us else r.note
    if comm.rank == 0:
        print(format_table(rows, f"latency, {comm.size} ranks, device ring mode {ring.mode}"))
        print(format_table(big, f"large, copy bandwidth {bw / 1e9:.0f} GB/s (read + write)"))
        for r in big:
            print(f"  {r.variant:>24s} {r.size >> 20:5d} MB  {r.note}")
    meta = run_metadata(comm, mode=ring.mode, mode_why=ring.mode_why, mps_visible=mps_visible(),
                        copy_bandwidth_Bps=bw, host_us_per_call=host, device_ring_host_pieces_us=parts, traces_ns=traces,
                        back_to_back_us=loops, launch_shapes=shapes,
                        command=" ".join(sys.argv))
    if comm.rank == 0 and args.json:
        write_json(args.json, rows + big, meta)
    for other in extra + others + [zero_copy, sys_scope]:
        if other is not None:
            other.close()
    ring.close()


if __name__ == "__main__":
    main()
