"""Public collectives: ``allreduce``, ``reduce_scatter``, ``allgather``, one signature for all.

Host (NumPy) buffers run the chosen algorithm over MPI directly. Device (CuPy) buffers use a
device-native executor when one is registered for the algorithm (``DEVICE_EXECUTORS``), else they
are staged through pinned host memory, since the MPI need not be CUDA-aware (correct first).
"""
import numpy as np
from mpi4py import MPI

from .arrays import as_array, is_device_array
from .ops import check_op_dtype
from .ring import ring_allgather_inplace, ring_allreduce_inplace, ring_reduce_scatter_inplace
from .schedule import chunk_bounds
from .transport import MpiTransport
from .validate import checked_call

__all__ = ["allreduce", "reduce_scatter", "allgather", "ALLREDUCE_ALGORITHMS", "DEVICE_EXECUTORS",
           "register_allreduce", "stage_through_host"]

# name -> fn(flat_host_buffer, transport, op, cache): in-place all-reduce of host memory.
ALLREDUCE_ALGORITHMS = {"ring": lambda buf, tr, op, cache: ring_allreduce_inplace(buf, tr, op, cache=cache)}
# name -> fn(flat_device_buffer, comm, op) -> bool: True if it ran the all-reduce on the device.
DEVICE_EXECUTORS = {}

_caches = {}
_pinned = {}


def register_allreduce(name, fn):
    """Add a host all-reduce algorithm ``fn(flat_buffer, transport, op, cache)`` under ``name``."""
    ALLREDUCE_ALGORITHMS[name] = fn


def _prepare_out(a, out, shape, what):
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
    buf = _pinned.get("stage")
    if buf is None or buf.nbytes < flat.nbytes:
        _pinned.pop("stage", None)
        buf = cupyx.empty_pinned(max(flat.nbytes, 1), dtype=np.uint8)
        _pinned["stage"] = buf
    host = buf[: flat.nbytes].view(flat.dtype)
    flat.get(out=host)
    run(host)
    flat.set(host)


def _transport(comm, timeout):
    return MpiTransport(comm) if timeout is None else MpiTransport(comm, timeout=timeout)


def _check_algo(algo, a):
    if algo not in ALLREDUCE_ALGORITHMS and not (is_device_array(a) and algo in DEVICE_EXECUTORS):
        raise ValueError(f"unknown algo {algo!r}; available: {', '.join(sorted(ALLREDUCE_ALGORITHMS))}")


def allreduce(x, out=None, op="sum", algo="ring", comm=None, timeout=None, validate=True):
    """All-reduce ``x`` over ``comm`` (default COMM_WORLD) and return ``out``.

    ``out=None`` allocates, ``out=x`` works in place. ``op``: sum, prod, max, min, avg. Every rank
    ends bitwise identical. ``timeout`` (s) bounds each wait; ``validate=False`` skips the
    cross-rank argument check (for benchmarks).
    """
    comm = comm if comm is not None else MPI.COMM_WORLD
    a = as_array(x)

    def local_checks():
        check_op_dtype(op, a.dtype)
        _check_algo(algo, a)
        return _prepare_out(a, out, a.shape, "allreduce")
    res = checked_call(comm, validate, ("allreduce", a.size, a.dtype.name, op, algo, out is x), local_checks,
                       timeout)
    if res is not a:
        res[...] = a
    flat = res.reshape(-1)
    if is_device_array(flat) and algo in DEVICE_EXECUTORS and DEVICE_EXECUTORS[algo](flat, comm, op):
        return res
    tr, cache = _transport(comm, timeout), _caches.setdefault(algo, {})
    stage_through_host(flat, lambda host: ALLREDUCE_ALGORITHMS[algo](host, tr, op, cache))
    return res


def reduce_scatter(x, out=None, op="sum", comm=None, timeout=None, validate=True):
    """Reduce ``x`` (same size on every rank); return this rank's chunk of the result, flat:
    elements ``chunk_bounds(x.size, N)[rank]`` (sizes differ by at most one across ranks)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    a = as_array(x)
    n, r = comm.size, comm.rank
    lo, hi = chunk_bounds(a.size, n)[r]

    def local_checks():
        check_op_dtype(op, a.dtype)
        return _prepare_out(a, out, (hi - lo,), "reduce_scatter")
    res = checked_call(comm, validate, ("reduce_scatter", a.size, a.dtype.name, op, "ring", False), local_checks,
                       timeout)
    work = a.reshape(-1).copy()   # the ring reduces in place; the caller's input stays intact
    tr, cache = _transport(comm, timeout), _caches.setdefault("reduce_scatter", {})

    def run(host):
        # rotate=-1 relabels chunks so that rank r ends owning chunk r (see schedule.py).
        ring_reduce_scatter_inplace(host, tr, op, rotate=-1, cache=cache)
        if op == "avg":
            np.divide(host[lo:hi], n, out=host[lo:hi], casting="unsafe")
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
        return _prepare_out(a, out, (n,) + tuple(a.shape), "allgather")
    res = checked_call(comm, validate, ("allgather", a.size, a.dtype.name, "-", "ring", False), local_checks,
                       timeout)
    res[r] = a
    tr = _transport(comm, timeout)
    stage_through_host(res.reshape(-1), lambda host: ring_allgather_inplace(host, tr, rotate=-1))
    return res
