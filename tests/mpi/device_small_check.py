"""MPI worker (GPU): device one-shot/two-shot against the host ring, bit for bit; exits non-zero on failure.

usage: device_small_check.py [--algos oneshot,twoshot] [--mode auto|per-rank|fallback] [--stall]
Every op and dtype bitwise equal to the host MPI ring (and within float64-reference tolerances), all ranks
identical, in place, repeated calls of mixed sizes on a side stream, CUDA-graph capture and replay, bad input.
``--stall``: rank 1 never calls; the others must get CollectiveTimeout naming rank 1 (RINGLAB_ABORT_ON_TIMEOUT=0).
"""
import argparse
import hashlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--algos", default="oneshot,twoshot")
p.add_argument("--mode", default="auto", help="auto (probe), per-rank or fallback")
p.add_argument("--stall", action="store_true", help="rank 1 never calls: the others must time out naming it")
args = p.parse_args()

from mpi4py import MPI  # noqa: E402
from ringlab.bench.harness import require_gpu  # noqa: E402

require_gpu("device_small_check.py")
import cupy  # noqa: E402
import numpy as np  # noqa: E402

from ringlab.arrays import use_local_gpu  # noqa: E402
from ringlab.errors import CollectiveTimeout  # noqa: E402
from ringlab.gpu.device_small import DeviceSmallAllreduce, choose_device_algorithm  # noqa: E402
from ringlab.ring import ring_allreduce_inplace  # noqa: E402
from ringlab.transport import MpiTransport  # noqa: E402

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank
use_local_gpu(comm)
algos = [a for a in args.algos.split(",") if a]
execs = {a: DeviceSmallAllreduce(comm, a, timeout=2.0 if args.stall else 60.0, mode=args.mode) for a in algos}
if rank == 0:
    for a, e in execs.items():
        print(f"device {a}: mode {e.mode} ({e.mode_why}), capacity {e.capacity} B, max parts {e.max_parts}", flush=True)
bad = []


def host_ring(x, op):
    buf = x.copy()
    ring_allreduce_inplace(buf, MpiTransport(comm), op=op)
    return buf


def same_everywhere(arr):
    digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
    return len(set(comm.allgather(digest))) == 1


def bits(a):
    return np.ascontiguousarray(a).view(np.uint8)


if args.stall:
    for a, e in execs.items():
        if rank != 1:
            x = cupy.ones(1 << 14, cupy.float32)
            try:
                e.allreduce(x, cupy.empty_like(x))
                e.synchronize()
                bad.append(f"{a}: no timeout")
            except CollectiveTimeout as exc:
                print(f"rank {rank}: {a}: CollectiveTimeout peer={exc.peer}: {exc}", flush=True)
                if exc.peer != 1:
                    bad.append(f"{a}: named peer {exc.peer}, not 1")
        comm.Barrier()
    ok = comm.allreduce(0 if bad else 1, op=MPI.MIN)
    print(f"rank {rank}: {'OK' if not bad else bad}", flush=True)
    if rank == 0:
        print("device_small_check stall OK" if ok else "device_small_check stall FAIL", flush=True)
    for e in execs.values():
        e.close()
    sys.exit(0 if ok else 1)

for a, e in execs.items():
    cap = e.capacity // 4
    # fp32 sum: bit-exact vs the host ring, all ranks identical, out of place and in place
    for count in sorted({1, max(n - 1, 1), n + 1, 1009, 4099, 65537, 100003, cap - 3, cap}):
        g = np.random.default_rng([rank, count])
        x = g.standard_normal(count).astype(np.float32)
        want = host_ring(x, "sum")
        dx = cupy.asarray(x)
        dy = cupy.full_like(dx, np.nan)
        e.allreduce(dx, dy, "sum")
        got = dy.get()
        if not np.array_equal(bits(got), bits(want)) or not same_everywhere(got):
            bad.append(f"{a} fp32 sum count={count}")
        e.allreduce(dx, dx, "sum")
        if not np.array_equal(bits(dx.get()), bits(want)):
            bad.append(f"{a} fp32 sum in place count={count}")
    # every op and dtype: the host ring's bits, and within a float64 reference's tolerance
    for dtype in ("float32", "float16", "float64", "int32", "int64"):
        for op in ("sum", "prod", "max", "min", "avg"):
            if op == "avg" and dtype.startswith("int"):
                continue
            for count in (0, 1, max(n - 1, 1), 1009, 30011):
                g = np.random.default_rng([rank, count, len(dtype), len(op)])
                x = (g.integers(-2, 3, count) if op == "prod" else g.integers(-999, 999, count)) \
                    if dtype.startswith("int") else (g.uniform(0.5, 1.5, count) if op == "prod" else g.standard_normal(count))
                x = x.astype(dtype)
                allx = np.stack(comm.allgather(x)).astype(np.float64).reshape(n, count)
                ref = {"sum": allx.sum(0), "avg": allx.mean(0), "prod": allx.prod(0), "max": allx.max(0),
                       "min": allx.min(0)}[op]
                want = host_ring(x, op)
                dx = cupy.asarray(x)
                dy = cupy.zeros_like(dx)
                e.allreduce(dx, dy, op)
                got = dy.get()
                tol = 0 if dtype.startswith("int") or op in ("max", "min") else \
                    (n + 1) * {"float16": 2 ** -11, "float32": 2 ** -24, "float64": 2 ** -53}[dtype] * 1.1
                scale = np.abs(allx).sum(0) if op in ("sum", "avg") else np.abs(ref)
                close = (np.abs(got.astype(np.float64) - ref) <= tol * scale + (1e-3 if dtype == "float16" else 0)).all()
                if count and (not np.array_equal(bits(got), bits(want)) or not close or not same_everywhere(got)):
                    bad.append(f"{a} {dtype} {op} count={count}")
    # repeated calls of mixed sizes (the per-part counters of unused parts lag) on a side stream
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for k, count in enumerate((4096, cap, 17, cap, 4096, 300001, 5)):
            x = cupy.arange(count, dtype=cupy.float32) % 97 * (rank + 1 + k)
            y = cupy.zeros_like(x)
            e.allreduce(x, y)
            want = cupy.arange(count, dtype=cupy.float32) % 97 * sum(r + 1 + k for r in range(n))
            if not bool((y == want).all()):
                bad.append(f"{a} repeated call {k} count={count}")
        stream.synchronize()
        # a CUDA graph of three calls (both scratch halves), replayed with new inputs
        graph_note = f"{a} graph: captured and replayed"
        x = cupy.arange(4096, dtype=cupy.float32) * (rank + 1)
        y = cupy.zeros_like(x)
        z = cupy.zeros_like(x)
        try:
            e.allreduce(x, y)                                # eager first: the kernel is loaded outside capture
            stream.synchronize()
            stream.begin_capture()
            e.allreduce(x, y)
            e.allreduce(y, z)
            e.allreduce(z, z)
            graph = stream.end_capture()
            for k in range(1, 5):
                x[...] = k * (rank + 1)
                graph.launch(stream)
                stream.synchronize()
                s = k * (n * (n + 1) // 2)
                if not (bool((y == s).all()) and bool((z == s * n * n).all())):
                    bad.append(f"{a} graph replay {k}")
        except Exception as exc:  # noqa: BLE001 - a mode that cannot be captured must say so clearly
            graph_note = f"{a} graph: {type(exc).__name__}: {exc}"
            if e.mode == "per-rank":
                bad.append(graph_note)
    e.synchronize()
    if rank == 0:
        print(graph_note, flush=True)
    # bad input: clear errors, nothing launched
    x = cupy.ones(64, cupy.float32)
    for what, call, kind in (("strided", lambda: e.allreduce(x[::2], x[::2]), ValueError),
                             ("int8", lambda: e.allreduce(cupy.ones(4, cupy.int8), cupy.ones(4, cupy.int8)), TypeError),
                             ("size mismatch", lambda: e.allreduce(x, x[:10]), ValueError),
                             ("over capacity", lambda: e.allreduce(cupy.ones(cap + 4, cupy.float32),
                                                                    cupy.ones(cap + 4, cupy.float32)), ValueError)):
        try:
            call()
            bad.append(f"{a} {what}: no error")
        except kind as exc:
            if rank == 0:
                print(f"{a} {what}: {type(exc).__name__}: {exc}", flush=True)

if rank == 0:
    print("auto picks (N=%d): " % n + ", ".join(f"{s} B {choose_device_algorithm(s, n)}"
                                              for s in (8, 4096, 65536, 262144, 1 << 20, 1 << 24)), flush=True)
bad = [b for group in comm.allgather(bad) for b in group]
if rank == 0:
    modes = ", ".join(f"{a}={e.mode}" for a, e in execs.items())
    print("\n".join(bad[:30]) if bad else f"device_small_check OK: N={n} {modes}", flush=True)
for e in execs.values():
    e.close()
sys.exit(1 if bad else 0)
