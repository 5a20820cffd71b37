"""MPI worker (GPU, MPS on): collectives on torch CUDA tensors run on torch's current stream, without a host
sync, and can be captured in ``torch.cuda.graph`` and replayed; exits non-zero on failure.

usage: mpirun -n 8 python3 tests/mpi/device_torch_check.py
Per route (device ring staged and zero-copy, one-shot, two-shot, auto, FP8 ring and fp8-direct, the host-driven
IPC ring, async): the input is written on a non-blocking torch stream behind a ~20 ms sleep kernel, so a
collective on any other stream reads stale data; the result must equal the NumPy call's bits, and the device
routes must return to the host before the sleep ends. Then each device route is captured in a CUDA graph and
replayed with new inputs. Last, what ``out=None`` under capture does (a clear error).
"""
import hashlib
import os
import sys
import warnings
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from mpi4py import MPI  # noqa: E402
from ringlab.bench.harness import require_gpu  # noqa: E402

require_gpu("device_torch_check.py")
import numpy as np  # noqa: E402
import torch  # noqa: E402

import ringlab  # noqa: E402
from ringlab.arrays import use_local_gpu  # noqa: E402
from ringlab.work import allreduce_async  # noqa: E402

comm = MPI.COMM_WORLD
rank, n = comm.rank, comm.size
torch.cuda.set_device(use_local_gpu(comm))
bad, notes = [], []
SLEEP_CYCLES = 40_000_000            # ~20 ms at the H200's ~2 GHz

ROUTES = {   # name -> (count, call(x, out), NumPy reference call, device route: no host sync, capturable)
    "device ring (staged)": (4099, lambda x, o: ringlab.allreduce(x, out=o, transport="device"),
                             lambda h: ringlab.allreduce(h), True),
    "device ring (zero-copy)": ((1 << 20) + 3, lambda x, o: ringlab.allreduce(x, out=o, transport="device"),
                                lambda h: ringlab.allreduce(h), True),
    "oneshot": (1009, lambda x, o: ringlab.allreduce(x, out=o, algo="oneshot"), lambda h: ringlab.allreduce(h), True),
    "twoshot": (1009, lambda x, o: ringlab.allreduce(x, out=o, algo="twoshot"), lambda h: ringlab.allreduce(h), True),
    "auto": (2048, lambda x, o: ringlab.allreduce(x, out=o, algo="auto"), lambda h: ringlab.allreduce(h), True),
    "fp8-ring": (65539, lambda x, o: ringlab.allreduce_fp8(x, out=o, transport="device"),
                 lambda h: ringlab.allreduce_fp8(h), True),
    "fp8-direct": (65539, lambda x, o: ringlab.allreduce_fp8(x, out=o, algo="fp8-direct", transport="device"),
                   lambda h: ringlab.allreduce_fp8(h, algo="fp8-direct"), True),
    "ipc (host-driven)": (4099, lambda x, o: ringlab.allreduce(x, out=o, transport="ipc"),
                          lambda h: ringlab.allreduce(h), False),
}


def inputs(count, k=1):
    return (np.random.default_rng([rank, count, k]).standard_normal(count) * k).astype(np.float32)


def reference(ref_call, count, k=1):
    return ref_call(inputs(count, k))


def check(what, got, want):
    got = got.detach().cpu().numpy()
    digests = comm.allgather(hashlib.sha1(got.tobytes()).hexdigest())
    if not np.array_equal(got.view(np.uint32), want.view(np.uint32)) or len(set(digests)) != 1:
        bad.append(f"{what}: wrong result ({np.count_nonzero(got != want)} of {got.size} differ)")


# ---- 1. stream order: the collective follows the producer on the caller's torch stream ------------------------
side = torch.cuda.Stream()          # torch's streams do not synchronise with the legacy default stream
with torch.cuda.stream(side):       # load the sleep and multiply kernels (lazy module loading synchronises)
    torch.cuda._sleep(1000)
    torch.ones(4, device="cuda") * 1
side.synchronize()
for name, (count, call, ref_call, device_route) in ROUTES.items():
    want = reference(ref_call, count)
    src = torch.from_numpy(inputs(count)).cuda()
    x = torch.zeros(count, device="cuda")
    out = torch.empty_like(x)
    call(x, out)                         # warm-up on these buffers: kernels compiled, tables uploaded
    x.zero_()
    torch.cuda.synchronize()
    comm.Barrier()
    with torch.cuda.stream(side):
        torch.cuda._sleep(SLEEP_CYCLES)
        x.copy_(src)                     # device to device: queued behind the sleep, no host wait
        queued = time.perf_counter()
        call(x, out)
        host_s = time.perf_counter() - queued
        copy = out * 1                   # a consumer on the same stream
        still_running = not side.query()
    side.synchronize()
    check(f"{name}: on a side torch stream", copy, want)
    if device_route and not still_running:
        bad.append(f"{name}: the call returned only after the stream drained ({host_s * 1e3:.1f} ms): a host sync")
    notes.append(f"{name}: host {host_s * 1e3:.2f} ms, stream still busy on return: {still_running}")

# async on a side stream: ready recorded on torch's stream, wait() orders torch's stream after the result
want = reference(lambda h: ringlab.allreduce(h), 4099)
src = torch.from_numpy(inputs(4099)).cuda()
x = torch.zeros(4099, device="cuda")
allreduce_async(x, out=torch.empty_like(x)).wait()
torch.cuda.synchronize()
with torch.cuda.stream(side):
    torch.cuda._sleep(SLEEP_CYCLES)
    x.copy_(src)
    work = allreduce_async(x, out=x)
    work.wait()
    copy = x * 1
side.synchronize()
check("allreduce_async on a side torch stream", copy, want)

# ---- 2. torch.cuda.graph: capture once, replay with new inputs -----------------------------------------------
for name, (count, call, ref_call, device_route) in ROUTES.items():
    if not device_route:
        continue
    x = torch.from_numpy(inputs(count)).cuda()
    out = torch.empty_like(x)
    with torch.cuda.stream(side):        # warm-up (tables uploaded, kernels compiled) outside the capture
        call(x, out)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            call(x, out)
    except Exception as exc:  # noqa: BLE001 - every device route must be capturable under MPS
        bad.append(f"{name}: capture failed: {type(exc).__name__}: {exc}")
        continue
    for k in (2, 3, 4):
        x.copy_(torch.from_numpy(inputs(count, k)))
        graph.replay()
        torch.cuda.synchronize()
        check(f"{name}: graph replay {k}", out, reference(ref_call, count, k))
    in_place = torch.from_numpy(inputs(count)).cuda()
    call(in_place, in_place)             # and in place, captured
    torch.cuda.synchronize()
    g2 = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g2):
        call(in_place, in_place)
    in_place.copy_(torch.from_numpy(inputs(count, 5)))
    g2.replay()
    torch.cuda.synchronize()
    check(f"{name}: in place, graph replay", in_place, reference(ref_call, count, 5))
    notes.append(f"{name}: captured in torch.cuda.graph, replayed")

# ---- 3. out=None allocates: under capture that must be a clear error on every rank, not a broken graph --------
x = torch.ones(4099, device="cuda")
ringlab.allreduce(x, transport="device")
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
try:
    with warnings.catch_warnings():                 # the refused capture leaves torch's graph empty: expected here
        warnings.filterwarnings("ignore", message="The CUDA Graph is empty")
        with torch.cuda.graph(graph):
            ringlab.allreduce(x, transport="device")
    notes.append("out=None under capture: captured (the pool had a free block)")
except Exception as exc:  # noqa: BLE001 - reported below
    message = f"{type(exc).__name__}: {exc}"
    notes.append(f"out=None under capture: {message[:300]}")
    if "out=" not in message:
        bad.append(f"out=None under capture: no clear error ({message[:200]})")

comm.Barrier()
bad = [b for group in comm.allgather(bad) for b in group]
if rank == 0:
    print("\n".join(notes), flush=True)
    print("\n".join(bad[:30]) if bad else f"device_torch_check OK: N={n}", flush=True)
sys.exit(1 if bad else 0)
