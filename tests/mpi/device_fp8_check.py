"""MPI worker (GPU): the device FP8 all-reduce (gpu/device_fp8.py) against the host FP8 path, bit for bit.

usage: mpirun -n 8 python3 tests/mpi/device_fp8_check.py [--mode auto|per-rank|host] [--quick] [--stall]
Both algos (fp8-ring, fp8-direct), e4m3 and e5m2, blocks 32/128/256, sum and avg, fp32 and fp16, counts
around chunk/part/slice edges, in place, repeated calls, a CUDA graph replayed, NaN/inf policy (docs/fp8.md),
bad input; all ranks bitwise identical (NaN payloads aside: the GPU's NaN is canonical). ``--stall``: rank 1
never calls, the others must raise CollectiveTimeout naming a stalled peer (run with RINGLAB_ABORT_ON_TIMEOUT=0).
Exits non-zero on failure.
"""
import argparse
import hashlib
import sys
import time

import numpy as np


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="auto", choices=["auto", "per-rank", "host"])
    p.add_argument("--quick", action="store_true", help="fewer formats, blocks and counts")
    p.add_argument("--stall", action="store_true", help="rank 1 never calls: expect CollectiveTimeout")
    p.add_argument("--algos", default="fp8-ring,fp8-direct")
    p.add_argument("--warp-steps", type=int, default=None, help="the kernels' warp tiles (fp8_ring_warps.py)")
    return p.parse_args(argv)


def main(argv=None):
    args = _args(argv)
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # noqa: BLE001 - one clear line, nonzero exit
        print(f"device_fp8_check: needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    from mpi4py import MPI

    import ringlab
    from ringlab.arrays import use_local_gpu
    from ringlab.errors import CollectiveTimeout
    from ringlab.gpu.device_fp8 import DeviceFp8Ring

    comm = MPI.COMM_WORLD
    n, rank = comm.size, comm.rank
    use_local_gpu(comm)
    bad, notes = [], []
    t0 = time.monotonic()

    def progress(what):
        """Rank 0's running log (flushed): a run cut off by its time limit still shows how far it got."""
        if rank == 0:
            print(f"[{time.monotonic() - t0:6.1f} s] {what}", flush=True)

    def same_everywhere(a):
        digest = hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()
        return len(set(comm.allgather(digest))) == 1

    def host(x, algo, fmt, block, op):
        return ringlab.allreduce_fp8(x, algo=algo, fmt=fmt, block=block, op=op)      # NumPy: HostFp8Codec

    def compare(ring, x, what, op="sum", in_place=False):
        want = host(x, ring.algo, ring.codec.fmt, ring.codec.block, op)
        dx = cupy.asarray(x)
        dy = dx if in_place else cupy.full_like(dx, np.nan)
        ring.allreduce(dx, dy, op)
        got = dy.get()
        bits = np.uint16 if x.dtype == np.float16 else np.uint32
        # bit for bit, except a NaN's payload: NVIDIA GPUs return the canonical NaN, NumPy keeps the operand's
        differ = (got.view(bits) != want.view(bits)) & ~(np.isnan(got) & np.isnan(want))
        if differ.any():
            bad.append(f"{what}: differs from the host FP8 path at {int(differ.sum())} elements")
        if not same_everywhere(got):
            bad.append(f"{what}: ranks differ")
        return got

    def make(algo, fmt, block, **kw):
        """The executor, or None when fp8-direct has no fallback here (no co-residency): noted, not a failure."""
        try:
            if args.warp_steps is not None:
                kw.setdefault("warp_steps", args.warp_steps)
            return DeviceFp8Ring(comm, fmt, block, algo, mode=args.mode, **kw)
        except RuntimeError as exc:
            if algo != "fp8-direct":
                raise
            notes.append(f"{algo}: skipped: {exc}")
            return None

    algos = args.algos.split(",")
    if args.stall:
        for algo in algos:
            ring = make(algo, "e4m3", 128, timeout=2.0)
            if ring is not None and rank != 1:
                x = cupy.ones(1 << 20, cupy.float32)
                try:
                    ring.allreduce(x, cupy.empty_like(x))
                    ring.synchronize()
                    bad.append(f"{algo}: no timeout")
                except CollectiveTimeout as exc:
                    print(f"rank {rank} {algo}: CollectiveTimeout peer={exc.peer}: {exc}", flush=True)
                    ok_peers = {1} if algo == "fp8-direct" else {(rank - 1) % n, (rank + 1) % n}
                    if exc.peer not in ok_peers:
                        bad.append(f"{algo}: peer {exc.peer}")
            comm.Barrier()
        bad = [b for group in comm.allgather(bad) for b in group]
        if rank == 0:
            print("\n".join(notes + bad) if bad else "\n".join(notes + [f"device_fp8_check stall OK: N={n}"]), flush=True)
        return 1 if bad else 0

    # every (format, block, dtype, op) is a kernel every rank compiles (seconds each): avg and fp16 on the first
    fmts_blocks = [("e4m3", 128), ("e5m2", 32)] if args.quick else [("e4m3", 128), ("e4m3", 32), ("e5m2", 256)]
    counts = (1, max(n - 1, 1), 1009, 100003) if args.quick else (1, max(n - 1, 1), 1009, 100003, (1 << 20) + 7)
    for algo in algos:
        for fmt, block in fmts_blocks:
            ring = make(algo, fmt, block, timeout=60.0, capacity=1 << 25)
            if ring is None:
                break
            if rank == 0:
                notes.append(f"{algo} {fmt}/{block}: mode {ring.mode} ({ring.mode_why})")
            progress(f"{algo} {fmt}/{block}: built, mode {ring.mode}; checking counts {counts}")
            big = (1 << 24) + 3 if (fmt, block) == ("e4m3", 128) and not args.quick else None   # 16 parts, 2 slices
            for count in counts + ((big,) if big else ()):
                g = np.random.default_rng([rank, count, block])
                x = (g.standard_normal(count) * 4).astype(np.float32)
                compare(ring, x, f"{algo} {fmt}/{block} fp32 sum count={count}")
                if count == 100003:
                    compare(ring, x, f"{algo} {fmt}/{block} fp32 sum in place count={count}", in_place=True)
                if count == 100003 and (fmt, block) == fmts_blocks[0]:      # each (dtype, op) is a kernel to compile
                    compare(ring, x, f"{algo} {fmt}/{block} fp32 avg count={count}", op="avg")
                    compare(ring, x.astype(np.float16), f"{algo} {fmt}/{block} fp16 avg count={count}", op="avg")
            # NaN / inf policy: NaN stays NaN; inf stays inf in E5M2, becomes NaN in E4M3; neighbours keep a scale
            x = np.random.default_rng([rank, 5]).standard_normal(4099).astype(np.float32)
            if rank == 0:
                x[10], x[2000] = np.nan, np.inf
            if rank == 1 % n:
                x[2001] = -np.inf
            got = compare(ring, x, f"{algo} {fmt}/{block} NaN/inf")
            want_inf = np.inf if fmt == "e5m2" else np.nan
            if not (np.isnan(got[10]) and (np.isnan(got[2000]) if fmt == "e4m3" else got[2000] == want_inf)
                    and np.isfinite(got[2002])):
                bad.append(f"{algo} {fmt}/{block} NaN/inf policy: {got[10]}, {got[2000]}, {got[2002]}")
            ring.close()
            progress(f"{algo} {fmt}/{block}: done ({len(bad)} failures on rank 0 so far)")

        # repeated calls on a side stream, then a CUDA graph of one call replayed with new inputs
        ring = make(algo, "e4m3", 128, timeout=60.0, capacity=1 << 20)
        if ring is None:
            continue
        stream = cupy.cuda.Stream(non_blocking=True)
        with stream:
            x = cupy.ones(65536, cupy.float32) * (rank + 1)
            y = cupy.zeros_like(x)
            for _ in range(3):
                ring.allreduce(x, y)
            want = host(x.get(), algo, "e4m3", 128, "sum")
            if not np.array_equal(y.get(), want):
                bad.append(f"{algo}: repeated calls on a side stream")
            note = f"{algo} graph: captured and replayed"
            try:
                stream.begin_capture()
                ring.allreduce(x, y)
                graph = stream.end_capture()
                for k in range(1, 4):
                    x[...] = k * (rank + 1)
                    graph.launch(stream)
                    stream.synchronize()
                    if not np.array_equal(y.get(), host(x.get(), algo, "e4m3", 128, "sum")):
                        bad.append(f"{algo}: graph replay {k}")
            except Exception as exc:  # noqa: BLE001 - a mode that cannot be captured must say so clearly
                note = f"{algo} graph: {type(exc).__name__}: {exc}"
                if ring.mode == "per-rank":
                    bad.append(note)
            notes.append(note)
        ring.synchronize()
        progress(note)
        for what, fn, err in (("int32 input", lambda: ring.allreduce(cupy.ones(8, cupy.int32), cupy.ones(8, cupy.int32)),
                               TypeError),
                              ("op max", lambda: ring.allreduce(cupy.ones(8, cupy.float32), cupy.ones(8, cupy.float32),
                                                                "max"), ValueError),
                              ("over capacity", lambda: ring.allreduce(cupy.ones(ring.capacity + 1, cupy.float32),
                                                                       cupy.ones(ring.capacity + 1, cupy.float32)),
                               ValueError)):
            try:
                fn()
                bad.append(f"{algo}: {what} accepted")
            except err as exc:
                notes.append(f"{algo} {what}: {type(exc).__name__}: {str(exc)[:90]}")
        ring.close()
    bad = [b for group in comm.allgather(bad) for b in group]
    if rank == 0:
        print("\n".join(notes), flush=True)
        print("\n".join(bad[:20]) if bad else f"device_fp8_check OK: N={n}", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
