"""MPI worker (GPU): the device ring against the host ring, bit for bit; exits non-zero on failure.

usage: device_ring_check.py [--mode auto|per-rank|single-context] [--stall [--stall-count C]]
Checks every op and dtype, fp32 sum bit-exact vs the host MPI ring, all ranks identical, in place,
repeated calls, CUDA-graph capture and replay, the staged and the zero-copy paths, the public API's
transport="device". ``--stall``: rank 1 never calls; the others must get
CollectiveTimeout naming their stalled neighbour (needs RINGLAB_ABORT_ON_TIMEOUT=0).
"""
import argparse
import hashlib
import sys

import cupy
import numpy as np
from mpi4py import MPI

from ringlab.arrays import use_local_gpu
from ringlab.errors import CollectiveTimeout
from ringlab.gpu.device_ring import DeviceRing
from ringlab.ring import ring_allreduce_inplace
from ringlab.transport import MpiTransport

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank
use_local_gpu(comm)
p = argparse.ArgumentParser()
p.add_argument("--mode", default="auto")
p.add_argument("--stall", action="store_true")
p.add_argument("--stage-split", action="store_true", help="staging halves for src and out (the ring out of place)")
p.add_argument("--max-in-flight", type=int, default=0, help="host waits for the call this many calls back")
p.add_argument("--stall-count", type=int, default=1 << 20, help="elements of the stalled call (small: staged path)")
args = p.parse_args()
ring = DeviceRing(comm, timeout=2.0 if args.stall else 60.0, mode=args.mode, stage_split=args.stage_split,
                  max_in_flight=args.max_in_flight)
if rank == 0:
    print(f"device ring mode: {ring.mode} ({ring.mode_why})", flush=True)
bad = []


def host_ring(x):
    buf = x.copy()
    ring_allreduce_inplace(buf, MpiTransport(comm), op="sum")
    return buf


def same_everywhere(arr):
    digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
    return len(set(comm.allgather(digest))) == 1


if args.stall:
    if rank != 1:
        x = cupy.ones(args.stall_count, cupy.float32)
        try:           # zero-copy: rank 1's neighbours stop at the host handshake; staged: every rank in the kernel
            ring.allreduce(x, cupy.empty_like(x))
            ring.synchronize()
            bad.append("no timeout")
        except CollectiveTimeout as exc:
            print(f"rank {rank}: CollectiveTimeout peer={exc.peer}: {exc}", flush=True)
            if exc.peer is None or exc.peer not in ((rank - 1) % n, (rank + 1) % n):
                bad.append(f"peer {exc.peer}")
    comm.Barrier()
    ok = comm.allreduce(0 if bad else 1, op=MPI.MIN)
    print(f"rank {rank}: {'OK' if not bad else bad}", flush=True)
    if rank == 0:
        print("device_ring_check stall OK" if ok else "device_ring_check stall FAIL", flush=True)
    sys.exit(0 if ok else 1)

# fp32 sum: bit-exact vs the host ring, all ranks identical; sizes around chunk/slice/part edges, through the
# staging buffer (<= ring.stage_bytes), zero copy (a second ring without staging), alternating, and the public API
import ringlab  # noqa: E402

zero_copy = DeviceRing(comm, timeout=60.0, mode=ring.mode, stage_bytes=0)
for count in (1, max(n - 1, 1), 1009, 100003, 1 << 20, (1 << 22) + 7):
    g = np.random.default_rng([rank, count])
    x = g.standard_normal(count).astype(np.float32)
    want = host_ring(x)
    dx = cupy.asarray(x)
    dy = cupy.full_like(dx, np.nan)
    ring.allreduce(dx, dy, "sum")
    got = dy.get()
    if not np.array_equal(got.view(np.uint32), want.view(np.uint32)) or not same_everywhere(got):
        bad.append(f"fp32 sum count={count}")
    ring.allreduce(dx, dx, "sum")                     # in place
    if not np.array_equal(dx.get().view(np.uint32), want.view(np.uint32)):
        bad.append(f"fp32 sum in place count={count}")
    dx = cupy.asarray(x)
    for other, what in ((zero_copy, "zero-copy"), (ring, "staged again"), (zero_copy, "zero-copy again")):
        dy = cupy.full_like(dx, np.nan)
        other.allreduce(dx, dy, "sum")
        if not np.array_equal(dy.get().view(np.uint32), want.view(np.uint32)):
            bad.append(f"fp32 sum {what} count={count}")
    api = ringlab.allreduce(dx, transport="device")
    if not np.array_equal(api.get().view(np.uint32), want.view(np.uint32)):
        bad.append(f"fp32 sum ringlab.allreduce(transport='device') count={count}")
zero_copy.close()

# every op and dtype: against the host ring's rules (float64 reference for floats, exact for ints)
for dtype in ("float32", "float16", "float64", "int32", "int64"):
    for op in ("sum", "prod", "max", "min", "avg"):
        if op == "avg" and dtype.startswith("int"):
            continue
        for count in (0, 1, n - 1 or 1, 1009):
            g = np.random.default_rng([rank, count, len(dtype), len(op)])
            x = (g.integers(-2, 3, count) if op == "prod" else g.integers(-999, 999, count)) if dtype.startswith("int") \
                else (g.uniform(0.5, 1.5, count) if op == "prod" else g.standard_normal(count))
            x = x.astype(dtype)
            allx = np.stack(comm.allgather(x)).astype(np.float64).reshape(n, count)
            ref = {"sum": allx.sum(0), "avg": allx.mean(0), "prod": allx.prod(0), "max": allx.max(0),
                   "min": allx.min(0)}[op]
            dx = cupy.asarray(x)
            dy = cupy.zeros_like(dx)
            ring.allreduce(dx, dy, op)
            got = dy.get().astype(np.float64)
            tol = 0 if dtype.startswith("int") or op in ("max", "min") else \
                (n + 1) * {"float16": 2 ** -11, "float32": 2 ** -24, "float64": 2 ** -53}[dtype] * 1.1
            scale = np.abs(allx).sum(0) if op in ("sum", "avg") else np.abs(ref)
            if count and (not (np.abs(got - ref) <= tol * scale + (1e-3 if dtype == "float16" else 0)).all()
                          or not same_everywhere(dy.get())):
                bad.append(f"{dtype} {op} count={count}")

# repeated calls on a side stream, then a CUDA graph of one call, replayed with new inputs
stream = cupy.cuda.Stream(non_blocking=True)
with stream:
    x = cupy.arange(4096, dtype=cupy.float32) * (rank + 1)
    y = cupy.zeros_like(x)
    for _ in range(3):
        ring.allreduce(x, y)
    stream.synchronize()
    if not bool((y == cupy.arange(4096, dtype=cupy.float32) * (n * (n + 1) // 2)).all()):
        bad.append("repeated calls on a side stream")
    graph_note = "graph: captured and replayed"
    try:
        stream.begin_capture()
        ring.allreduce(x, y)
        graph = stream.end_capture()
        for k in range(1, 4):
            x[...] = k * (rank + 1)
            graph.launch(stream)
            stream.synchronize()
            if not bool((y == k * (n * (n + 1) // 2)).all()):
                bad.append(f"graph replay {k}")
    except Exception as exc:  # noqa: BLE001 - a mode that cannot be captured must say so clearly
        graph_note = f"graph: {type(exc).__name__}: {exc}"
        if ring.mode == "per-rank":
            bad.append(graph_note)
ring.synchronize()
if rank == 0:
    print(graph_note, flush=True)
bad = [b for group in comm.allgather(bad) for b in group]
if rank == 0:
    print("\n".join(bad[:20]) if bad else f"device_ring_check OK: N={n} mode={ring.mode}", flush=True)
ring.close()
sys.exit(1 if bad else 0)
