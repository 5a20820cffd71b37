"""Device FP8 all-reduce (e4m3 ring, fp8-direct) vs the fp32 device ring at 64 and 256 MB, ranks sharing a GPU.

    mpirun -n 8 python experiments/device_fp8_bench.py --json out.json      # (start MPS first: per-rank kernels)

Effective algbw counts the uncompressed fp32 bytes. Every row is checked before it is timed (FP8: bit for bit
against the host FP8 path up to --oracle-max elements, above it the error bound and all ranks identical).
Time: --calls back-to-back calls between two events after a barrier, slowest rank, median of --rounds.

    python experiments/device_fp8_bench.py --hop-error docs/results/device_fp8/hop_error.json   # CPU, no MPI

``--hop-error``: the relative L2 error of both FP8 algos vs the float64 sum, as docs/fp8.md reports it, from the
host FP8 executors run in-process (threads), after checking that the simulated device kernels give their bits.
"""
import argparse
import hashlib
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _args(argv=None):
    from ringlab.bench.harness import size_list_arg
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size_list_arg, default=size_list_arg("64M,256M"), help="fp32 bytes per call")
    p.add_argument("--paths", default="fp32-ring,fp8-ring,fp8-direct")
    p.add_argument("--fmt", default="e4m3")
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--mode", default="auto", help="auto, per-rank, or host (FP8) / single-context (fp32)")
    p.add_argument("--threads", type=int, default=None, help="FP8 kernels: threads per block (default: per algo, "
                   "device_fp8.LAUNCH)")
    p.add_argument("--max-registers", type=int, default=None, help="FP8 kernels: registers per thread (cap; default: "
                   "per algo)")
    p.add_argument("--shapes", default=None, help="FP8 launch shapes to sweep, each THREADSxREGS[@BLOCKS_PER_SM]"
                   "[:TILES:FWD_TILES|:wSTEPS][sSLICE_KB][gGROUP][kMAX_SLICES][pROUNDS], e.g. 1024x64:1:2s4096, "
                   "1024x64:1:2p1 (L2 prefetch 1 round ahead), 512x64@2:1:4, 768x80:w4 (default: each algo's shape, "
                   "device_fp8.LAUNCH, or --threads x --max-registers, with the executor's tiles); every shape is "
                   "checked before it is timed")
    p.add_argument("--fp32-shapes", default="", help="more fp32 device ring rows, device_ring_bench.py's shapes "
                   "(e.g. 768x1r80s64g1k32: 64 KB slices, walked one slice per group); x fp32 is vs the default ring")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--oracle-max", type=int, default=(1 << 24) + 1, help="largest count checked bit for bit")
    p.add_argument("--trace-calls", type=int, default=5, help="traced calls per ring row: where a call's time goes "
                   "on the GPU's clock, per primitive (0: none)")
    p.add_argument("--json", default=None)
    p.add_argument("--hop-error", metavar="JSON", default=None, help="CPU only: the error table (see above)")
    return p.parse_args(argv)


class _ThreadTransport:
    """sendrecv between the threads of one process, so collectives/fp8.py's executors run N ranks in-process."""

    def __init__(self, rank, size, boxes):
        import types
        self.comm, self.boxes = types.SimpleNamespace(rank=rank, size=size), boxes

    def sendrecv(self, send, dest, recv, source, what=""):
        self.boxes[(self.comm.rank, dest)].put(np.array(send, copy=True))
        recv[...] = self.boxes[(source, self.comm.rank)].get(timeout=60)


def _in_process(srcs, algo, fmt, block):
    """Every rank's result of the host FP8 executor for ``algo`` on ``srcs`` (threads, HostFp8Codec)."""
    import queue
    import threading
    from ringlab.fp8 import fp8_direct_allreduce, fp8_ring_allreduce
    from ringlab.kernels.codec import HostFp8Codec
    n = len(srcs)
    boxes = {(a, b): queue.Queue() for a in range(n) for b in range(n)}
    outs = [np.zeros_like(x) for x in srcs]
    fn = fp8_ring_allreduce if algo == "fp8-ring" else fp8_direct_allreduce
    threads = [threading.Thread(target=fn, args=(srcs[r], outs[r], _ThreadTransport(r, n, boxes),
                                                 HostFp8Codec(fmt, block), "sum")) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outs


def _simulated_device(srcs, algo, fmt, block):
    """Every rank's result of the device kernels in numba's CUDA simulator (ranks = threads of one block)."""
    from ringlab.gpu.device_plan import address_row, chunk_blocks, direct_row, first_chunk, fp8_send_layout, program_table
    from ringlab.kernels import flags
    from ringlab.kernels.fp8_direct_kernel import direct_kernel
    from ringlab.kernels.ring_kernel import fp8_codec, ring_kernel
    n, count, R = len(srcs), srcs[0].size, flags.register
    cb, sb = fp8_send_layout(count, n, block)
    codes, scales = [np.zeros(cb, np.uint8) for _ in srcs], [np.zeros(sb // 4, np.float32) for _ in srcs]
    words = [[np.zeros(128, np.uint64) for _ in srcs] for _ in range(4)]      # flags, status, trace, calls
    outs = [np.zeros_like(x) for x in srcs]
    nbc = chunk_blocks(count, n, block)
    if algo == "fp8-ring":
        rows = [address_row(R(srcs[r]), R(outs[r]), 0, 0, R(words[0][r]), R(words[0][r - 1]), R(words[0][(r + 1) % n]),
                            R(words[1][r]), R(words[2][r]), R(words[3][r]), r, n, send_codes=R(codes[r]),
                            send_scales=R(scales[r]), left_codes=R(codes[r - 1]), left_scales=R(scales[r - 1]),
                            blocks_per_chunk=nbc, first=first_chunk(count, n, r)) for r in range(n)]
        table, prog = np.array(rows, np.int64), program_table(n, count, range(n))
        ring_kernel(np.float32, "sum", fp8_codec(fmt, block))[(2, 1), (1, n)](R(table), R(prog), 2 * n - 1, 2, 0)
    else:
        peers = np.array([[R(codes[q]), R(scales[q]), R(words[0][q])] for q in range(n)], np.int64)
        rows = [direct_row(R(srcs[r]), R(outs[r]), R(codes[r]), R(scales[r]), R(words[0][r]), R(words[1][r]),
                           R(words[2][r]), R(words[3][r]), r, nbc, R(peers)) for r in range(n)]
        direct_kernel(np.float32, "sum", fmt, block)[(2, 1), (1, n)](R(np.array(rows, np.int64)), n, count, 0, 0)
    return outs


def hop_error(path):
    """docs/fp8.md's error table for the device path (CPU): simulated kernels == host bits, then the errors."""
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    from ringlab.kernels import patch_numpy_for_numba
    patch_numpy_for_numba()
    rows = []
    for algo in ("fp8-ring", "fp8-direct"):                       # the device kernels give the host's bits
        for n in (2, 4, 8):
            srcs = [np.random.default_rng([n, r]).standard_normal(1031).astype(np.float32) for r in range(n)]
            want, got = _in_process(srcs, algo, "e4m3", 128), _simulated_device(srcs, algo, "e4m3", 128)
            assert all(np.array_equal(a.view(np.uint32), b.view(np.uint32)) for a, b in zip(want, got)), (algo, n)
    print("simulated device kernels == host FP8 executors, bit for bit (e4m3/128, N = 2, 4, 8, 1031 elements)")
    for fmt in ("e4m3", "e5m2"):
        for block in (32, 128):
            for algo in ("fp8-direct", "fp8-ring"):
                errs = {}
                for n in (2, 4, 8, 16):
                    srcs = [np.random.default_rng([7, n, r]).standard_normal(65536).astype(np.float32) for r in range(n)]
                    exact = np.sum([x.astype(np.float64) for x in srcs], axis=0)
                    out = _in_process(srcs, algo, fmt, block)[0]
                    errs[n] = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))
                rows.append({"fmt": fmt, "block": block, "data": "normal", "algo": algo, "rel_l2": errs})
                print(f"| {fmt} | {block} | normal | {algo} | " + " | ".join(f"{errs[n]:.2e}" for n in errs) + " |")
    with open(path, "w") as f:
        json.dump({"meta": {"elements_per_rank": 65536, "seed": "default_rng([7, N, rank])", "how":
                            "host FP8 executors in-process; device kernels checked bit-identical in the simulator"},
                   "rows": rows}, f, indent=1)
    return 0


def parse_shapes(text, threads=None, max_registers=None):
    """[(label, {threads, max_registers, blocks_per_sm, tiles?, fwd_tiles?, warp_steps?})] of a --shapes list
    (``:wS``: fp8_ring_warps.py's warp tiles of S quads per lane); no list: each algo's default shape
    (device_fp8.LAUNCH), or ``threads`` x ``max_registers`` where given."""
    import re
    if not text:
        kw = {k: v for k, v in (("threads", threads), ("max_registers", max_registers)) if v is not None}
        return [("default" if not kw else f"{threads or '-'}x{max_registers or '-'}", kw)]
    shapes = []
    for item in text.split(","):
        m = re.fullmatch(r"(\d+)x(\d+)(?:@(\d+))?(?::(\d+):(\d+)|:w(\d+))?(?:s(\d+))?(?:g(\d+))?(?:k(\d+))?(?:p(\d+))?",
                         item.strip())
        if not m:
            raise SystemExit(f"--shapes: {item!r} is not THREADSxREGS[@BLOCKS_PER_SM][:TILES:FWD_TILES|:wSTEPS]"
                             "[sSLICE_KB][gGROUP][kMAX_SLICES][pROUNDS]")
        kw = {"threads": int(m[1]), "max_registers": int(m[2]), "blocks_per_sm": int(m[3] or 1)}
        if m[4] is not None:
            kw.update(tiles=int(m[4]), fwd_tiles=int(m[5]))
        if m[6] is not None:
            kw.update(warp_steps=int(m[6]))
        for key, v, scale in (("slice_bytes", m[7], 1024), ("group", m[8], 1), ("max_slices", m[9], 1),
                              ("prefetch", m[10], 1)):
            if v is not None:
                kw[key] = int(v) * scale
        shapes.append((item.strip(), kw))
    return shapes


def ring_phases(comm, ex, x, y, calls):
    """Medians over ``calls`` barrier-aligned traced calls of a ring executor, us on the GPU clock, slowest rank:
    primitive 0 (first send), each reduce-scatter hop, each all-gather hop, the exit (after the last primitive)."""
    import cupy
    n = comm.size
    per = []
    for _ in range(calls):
        comm.Barrier()
        ex._launch(x, y, "sum", 120.0, trace=True)
        cupy.cuda.get_current_stream().synchronize()
        w = np.array([int(v) for v in ex.trace[:2 * n]], np.int64)     # start, end of primitives 1..2N-2, exit
        d = np.diff(w) / 1e3
        per.append(np.max(comm.allgather(d), axis=0))
    d = np.median(np.array(per), axis=0)
    return {"first_to_hop1": round(float(d[0]), 1), "reduce_hop": round(float(np.median(d[1:n - 1])), 1) if n > 2 else None,
            "allgather_hop": round(float(np.median(d[n - 1:2 * n - 2])), 1), "exit": round(float(d[-1]), 1),
            "total": round(float(d.sum()), 1)}


def main(argv=None):
    args = _args(argv)
    if args.hop_error:
        return hop_error(args.hop_error)
    from ringlab.bench.harness import require_gpu
    require_gpu("device_fp8_bench.py")
    import cupy
    from mpi4py import MPI

    import ringlab
    from ringlab.arrays import use_local_gpu
    from ringlab.bench.harness import run_metadata
    from ringlab.fp8 import fp8_allreduce_error_bound
    from ringlab.gpu.device_fp8 import LAUNCH, DeviceFp8Ring
    from ringlab.gpu.device_plan import hbm_bytes_per_element
    from ringlab.gpu.device_ring import get_device_ring, mps_visible
    from experiments.gpu_datapath import copy_bandwidth

    comm = MPI.COMM_WORLD
    n, rank = comm.size, comm.rank
    use_local_gpu(comm)
    say = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    bw = comm.bcast(copy_bandwidth() if rank == 0 else None, root=0)
    say(f"device copy bandwidth (read + write): {bw / 1e9:.0f} GB/s; MPS pipe visible: {mps_visible()}")
    capacity = max(args.sizes) // 4
    paths = args.paths.split(",")
    fp32 = get_device_ring(comm, timeout=120.0, mode="auto" if args.mode in ("auto", "host") else args.mode)
    shapes = parse_shapes(args.shapes, args.threads, args.max_registers)
    runs = [("fp32-ring", "-", None)] if "fp32-ring" in paths else []
    from experiments.device_ring_bench import shape_arg
    runs += [("fp32-ring", s, shape_arg(s)) for s in args.fp32_shapes.split(",") if s]
    runs += [(path, label, kw) for label, kw in shapes for path in paths if path != "fp32-ring"]

    def executor(path, kw):
        if path == "fp32-ring" and kw is None:
            return fp32
        try:
            if path == "fp32-ring":
                from ringlab.gpu.device_ring import DeviceRing
                return DeviceRing(comm, timeout=120.0, **kw)
            return DeviceFp8Ring(comm, args.fmt, args.block, path, timeout=120.0, capacity=capacity, mode=args.mode,
                                 **kw)
        except (RuntimeError, ValueError) as exc:   # fp8-direct without co-resident kernels, or a refused shape
            say(f"{path}: skipped: {exc}")
            return None

    def same_everywhere(a):
        return len(set(comm.allgather(hashlib.sha1(a.tobytes()).hexdigest()))) == 1

    def check(path, x, y, count):
        """('' when right, else what is wrong; how it was checked). Collective."""
        if path == "fp32-ring":      # small integers: the exact sum
            want = cupy.arange(count, dtype=cupy.float32) % 7 * n + n * (n - 1) // 2
            ok = comm.allreduce(int(bool((y == want).all())), op=MPI.MIN)
            return ("" if ok else "fp32 sum wrong"), "exact"
        got = y.get()
        if count <= args.oracle_max:
            want = ringlab.allreduce_fp8(x.get(), algo=path, fmt=args.fmt, block=args.block)
            ok = np.array_equal(got.view(np.uint32), want.view(np.uint32))
            how = "bit-exact vs host"
        else:
            exact = cupy.empty_like(x)
            fp32.allreduce(x, exact, "sum")
            big = comm.allreduce(float(cupy.abs(x).max()), op=MPI.MAX)
            bound = fp8_allreduce_error_bound(args.fmt, n, big, algo=path)
            ok = bool((cupy.abs(y - exact) <= bound).all())
            how = "error bound"
        same = same_everywhere(got)                # collective: every rank, whatever ok is
        ok = comm.allreduce(int(ok and same), op=MPI.MIN)
        return "" if ok else f"{how} check failed", how

    rows, modes = [], {}
    for path, label, kw in runs:                        # one executor per (path, shape): sizes inside
        ex = executor(path, kw)
        if ex is None:
            continue
        modes[f"{path} {label}"] = getattr(ex, "mode", "?")
        for nbytes in args.sizes:
            count = nbytes // 4
            if path == "fp32-ring":
                x = (cupy.arange(count, dtype=cupy.float32) % 7 + rank).astype(cupy.float32)
            else:
                x = cupy.random.default_rng(rank + 17).standard_normal(count, dtype=cupy.float32)
            y = cupy.empty_like(x)
            stream = cupy.cuda.get_current_stream()
            ex.allreduce(x, y, "sum")
            ex.synchronize()
            wrong, how = check(path, x, y, count)
            assert not wrong, f"{path} {label} {nbytes} B: {wrong}"
            times = []
            for _ in range(args.rounds):
                comm.Barrier()
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record(stream)
                for _ in range(args.calls):
                    ex.allreduce(x, y, "sum")
                end.record(stream)
                end.synchronize()
                ex.synchronize()
                times.append(comm.allreduce(cupy.cuda.get_elapsed_time(start, end) * 1e-3 / args.calls, op=MPI.MAX))
            t = float(np.median(times))
            phases = ring_phases(comm, ex, x, y, args.trace_calls) if args.trace_calls and path != "fp8-direct" \
                and getattr(ex, "mode", "") == "per-rank" else None
            bpe = hbm_bytes_per_element(path, n, args.block)
            floor = n * bpe * count / bw            # every rank's traffic on the one GPU's HBM
            rows.append({"path": path, "shape": label, "fmt": args.fmt if path != "fp32-ring" else "fp32",
                         "block": args.block, "bytes": nbytes, "count": count, "nranks": n, "median_ms": t * 1e3,
                         "algbw_GBps": nbytes / t / 1e9, "hbm_bytes_per_elem": bpe, "hbm_floor_ms": floor * 1e3,
                         "pct_of_hbm_floor": 100 * floor / t, "mode": getattr(ex, "mode", "?"),
                         "mode_why": getattr(ex, "mode_why", ""), "checked": how,
                         "max_parts": getattr(ex, "max_parts", None), "times_ms": [v * 1e3 for v in times],
                         "trace_us": phases, "group": getattr(ex, "group", 0)})
            del x, y
        if ex is not fp32:
            ex.close()
    for r in rows:
        base = next(b for b in rows if b["bytes"] == r["bytes"] and b["path"] == "fp32-ring" and b["shape"] == "-") \
            if "fp32-ring" in paths else None
        r["speedup_vs_fp32_ring"] = base["median_ms"] / r["median_ms"] if base else None
    meta = run_metadata(comm, copy_bandwidth_Bps=bw, mps_pipe_visible=mps_visible(), fmt=args.fmt, block=args.block,
                        threads=args.threads, max_registers=args.max_registers, shapes=[s for s, _ in shapes],
                        launch_defaults={k: list(v) for k, v in LAUNCH.items()}, modes=modes)
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    say(f"#{'path':>11s} {'shape':>14s} {'size':>10s} {'mode':>10s} {'time ms':>9s} {'algbw GB/s':>11s} {'x fp32':>7s} "
        f"{'HBM B/el':>9s} {'% floor':>8s} {'checked':>18s}")
    for r in rows:
        sp = f"{r['speedup_vs_fp32_ring']:.2f}" if r["speedup_vs_fp32_ring"] else "-"
        say(f" {r['path']:>11s} {r['shape']:>14s} {r['bytes'] >> 20:>8d}MB {r['mode']:>10s} {r['median_ms']:9.3f} {r['algbw_GBps']:11.1f} "
            f"{sp:>7s} {r['hbm_bytes_per_elem']:9.2f} {r['pct_of_hbm_floor']:7.0f}% {r['checked']:>18s}")
    for r in rows:
        if r["trace_us"]:
            say(f"# {r['path']} {r['shape']} {r['bytes'] >> 20} MB, one traced call on the GPU clock (us, slowest rank, "
                f"median of {args.trace_calls}): " + ", ".join(f"{k} {v}" for k, v in r["trace_us"].items())
                + (f" (walk in groups of {r['group']}: the hops are the last group's, compare the total only)"
                   if r["group"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
