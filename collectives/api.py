"""Public collectives: ``allreduce``, ``reduce_scatter``, ``allgather``, one signature for all.

Host (NumPy) buffers run the chosen algorithm over MPI directly. Device (CuPy) buffers take the
transport ``device.select_transport`` picks: the CUDA IPC ring when all ranks share a node, the
ring over CUDA-aware MPI, or pinned host staging (any algorithm; correct first).
"""
import threading

import numpy as np
from mpi4py import MPI

from ringlab.arrays import as_array, is_device_array
from ringlab.ops import check_op_dtype
from ringlab.gpu.device import select_transport
from ringlab.ring import divide_inplace, ring_allgather_inplace, ring_allreduce_inplace, ring_reduce_scatter_inplace
from ringlab.schedule import chunk_bounds
from ringlab.transport import CudaAwareMpiTransport, MpiTransport
from ringlab.validate import checked_call

__all__ = ["allreduce", "reduce_scatter", "allgather", "ALLREDUCE_ALGORITHMS", "register_allreduce",
           "stage_through_host", "prepare_out", "IPC_DTYPES"]

# name -> fn(flat_host_buffer, transport, op, cache): in-place all-reduce of host memory.
ALLREDUCE_ALGORITHMS = {"ring": lambda buf, tr, op, cache: ring_allreduce_inplace(buf, tr, op, cache=cache)}
# dtypes the IPC ring's CuPy kernels reduce (bfloat16 device arrays are staged)
IPC_DTYPES = ("float16", "float32", "float64", "int32", "int64")
# device-only algorithms: every rank reads every peer's buffers over CUDA IPC (collectives/gpu/ipc_direct.py)
DEVICE_ALGORITHMS = ("oneshot", "twoshot")

_scratch = threading.local()   # per-thread buffers: async collectives run on a progress thread


def _cache(name):
    """This thread's scratch dict for ``name`` (receive buffers, pinned staging buffers)."""
    caches = getattr(_scratch, "caches", None)
    if caches is None:
        caches = _scratch.caches = {}
    return caches.setdefault(name, {})


def register_allreduce(name, fn):
    """Add a host all-reduce algorithm ``fn(flat_buffer, transport, op, cache)`` under ``name``."""
    ALLREDUCE_ALGORITHMS[name] = fn


def prepare_out(a, out, shape, what):
    """The output array: allocated when ``out`` is None, else checked for place, dtype and shape."""
    if out is None:
        if is_device_array(a):
            import cupy
            return cupy.empty(shape, dtype=a.dtype)
        return np.empty(shape, dtype=a.dtype)
    o = as_array(out)
    if is_device_array(o) != is_device_array(a):
        raise TypeError(f"{what}: out is a {'device' if is_device_array(o) else 'host'} array but the "
                        f"input is a {'device' if is_device_array(a) else 'host'} array")
    if o.dtype != a.dtype:
        raise TypeError(f"{what}: out has dtype {o.dtype}, the input has {a.dtype}")
    if tuple(o.shape) != tuple(shape):
        raise ValueError(f"{what}: out has shape {tuple(o.shape)}, expected {tuple(shape)}")
    if not o.flags.c_contiguous:
        raise ValueError(f"{what}: out must be C-contiguous (it is written in place)")
    return o


def stage_through_host(flat, run):
    """Run ``run(host_flat)`` on ``flat``; a device array is copied through a cached pinned buffer."""
    if not is_device_array(flat):
        run(flat)
        return
    import cupyx
    pinned = _cache("pinned")
    buf = pinned.get("stage")
    if buf is None or buf.nbytes < flat.nbytes:
        pinned.pop("stage", None)
        buf = cupyx.empty_pinned(max(flat.nbytes, 1), dtype=np.uint8)
        pinned["stage"] = buf
    host = buf[: flat.nbytes].view(flat.dtype)
    flat.get(out=host)     # on the current stream; blocks until the bytes are on the host
    run(host)
    flat.set(host)


def _transport(comm, timeout, kind=MpiTransport):
    """A ``kind`` transport on ``comm`` with ``timeout`` (None: the transport's default)."""
    return kind(comm) if timeout is None else kind(comm, timeout=timeout)


def _check_algo(algo, a):
    if algo in DEVICE_ALGORITHMS:
        if not is_device_array(a):
            raise ValueError(f"algo {algo!r} reads peers' GPU memory over CUDA IPC: it needs device (CuPy) arrays")
        if a.dtype.name not in IPC_DTYPES:
            raise TypeError(f"algo {algo!r} supports {', '.join(IPC_DTYPES)}, not {a.dtype.name}")
        return
    if algo not in ALLREDUCE_ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; available: {', '.join(sorted(ALLREDUCE_ALGORITHMS))}")


def allreduce(x, out=None, op="sum", algo="ring", comm=None, timeout=None, validate=True, transport=None):
    """All-reduce ``x`` over ``comm`` (default COMM_WORLD) and return ``out``.

    ``out=None`` allocates, ``out=x`` works in place. ``op``: sum, prod, max, min, avg. Every rank
    ends bitwise identical. ``timeout`` (s) bounds each wait; ``validate=False`` skips the
    cross-rank argument check (for benchmarks). ``transport`` (device arrays only): None/"auto",
    "ipc", "ipc:K" (K pipeline slices), "ipc-host", "ipc-shared", "mpi" (CUDA-aware), "staged".
    """
    comm = comm if comm is not None else MPI.COMM_WORLD
    a = as_array(x)

    def local_checks():
        check_op_dtype(op, a.dtype)
        _check_algo(algo, a)
        return prepare_out(a, out, a.shape, "allreduce")
    route = algo if transport is None else f"{algo} via {transport}"   # ranks must agree on both
    res = checked_call(comm, validate, ("allreduce", a.size, a.dtype.name, op, route, out is x), local_checks,
                       timeout)
    if is_device_array(a) and _device_allreduce(a, res, op, algo, comm, timeout, transport):
        return res
    if res is not a:
        res[...] = a
    tr, cache = _transport(comm, timeout), _cache(algo)
    stage_through_host(res.reshape(-1), lambda host: ALLREDUCE_ALGORITHMS[algo](host, tr, op, cache))
    return res


def _device_allreduce(a, res, op, algo, comm, timeout, transport):
    """Run a device-native all-reduce of ``a`` into ``res``; False leaves it to host staging."""
    import cupy
    src = a.reshape(-1) if a.flags.c_contiguous else cupy.ascontiguousarray(a).reshape(-1)
    if algo in DEVICE_ALGORITHMS:
        from ringlab.gpu.ipc import ipc_usable
        from ringlab.gpu.ipc_direct import get_ipc_direct
        usable, why = ipc_usable(comm)
        if not usable:
            raise ValueError(f"algo {algo!r} needs CUDA IPC between all ranks, which is unusable here: {why}")
        get_ipc_direct(comm).allreduce(src, res.reshape(-1), op, algo=algo, timeout=timeout)
        return True
    if algo != "ring":
        return False
    name, slices, _ = select_transport(comm, transport)
    if name in ("ipc", "ipc-host", "ipc-shared") and a.dtype.name in IPC_DTYPES:
        from ringlab.gpu.ipc import get_ipc_ring
        ring = get_ipc_ring(comm, slices, {"ipc": "stream", "ipc-host": "host", "ipc-shared": "shared"}[name])
        ring.allreduce(src, res.reshape(-1), op, timeout=timeout)
        return True
    if name == "mpi":
        if res is not a:
            res[...] = a
        tr = _transport(comm, timeout, CudaAwareMpiTransport)
        ring_allreduce_inplace(res.reshape(-1), tr, op, cache=_cache("ring-device"))
        return True
    return False


def reduce_scatter(x, out=None, op="sum", comm=None, timeout=None, validate=True):
    """Reduce ``x`` (same size on every rank); return this rank's chunk of the result, flat:
    elements ``chunk_bounds(x.size, N)[rank]`` (sizes differ by at most one across ranks)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    a = as_array(x)
    n, r = comm.size, comm.rank
    lo, hi = chunk_bounds(a.size, n)[r]

    def local_checks():
        check_op_dtype(op, a.dtype)
        return prepare_out(a, out, (hi - lo,), "reduce_scatter")
    res = checked_call(comm, validate, ("reduce_scatter", a.size, a.dtype.name, op, "ring", False), local_checks,
                       timeout)
    work = a.reshape(-1).copy()   # the ring reduces in place; the caller's input stays intact
    tr, cache = _transport(comm, timeout), _cache("reduce_scatter")

    def run(host):
        # rotate=-1 relabels chunks so that rank r ends owning chunk r (see schedule.py).
        ring_reduce_scatter_inplace(host, tr, op, rotate=-1, cache=cache)
        if op == "avg":
            divide_inplace(host[lo:hi], n)
    stage_through_host(work, run)
    res[...] = work[lo:hi]
    return res


def allgather(x, out=None, comm=None, timeout=None, validate=True):
    """Gather ``x`` (same shape on every rank) from all ranks: ``out[r]`` is rank r's ``x``."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    a = as_array(x)
    n, r = comm.size, comm.rank

    def local_checks():
        check_op_dtype("sum", a.dtype)
        return prepare_out(a, out, (n,) + tuple(a.shape), "allgather")
    res = checked_call(comm, validate, ("allgather", a.size, a.dtype.name, "-", "ring", False), local_checks,
                       timeout)
    res[r] = a
    tr = _transport(comm, timeout)
    stage_through_host(res.reshape(-1), lambda host: ring_allgather_inplace(host, tr, rotate=-1))
    return res
