"""Public collectives: ``allreduce``, ``reduce_scatter``, ``allgather``, one call shape for all.

    collective(x, out=None, op="sum", algo="ring", comm=None, timeout=None, *, validate=True, transport=None)

Host (NumPy) buffers run the chosen algorithm over MPI directly. Device (CuPy) buffers take the
transport ``device.select_transport`` picks (settings.TRANSPORTS): the CUDA IPC ring when all ranks
share a node, the ring over CUDA-aware MPI, or pinned host staging (any algorithm; correct first).
"""
import threading

import numpy as np
from mpi4py import MPI

from ringlab import faults
from ringlab.arrays import as_array, is_device_array, returns_input_type
from ringlab.commstate import comm_state
from ringlab.errors import CollectiveError, CollectiveTimeout, resolve_timeout
from ringlab.ops import OPS, SUPPORTED_DTYPES, check_op_dtype, dtype_label
from ringlab.kernels.optable import DEVICE_DTYPES
from ringlab.gpu.device import cuda_aware_mpi, select_transport
from ringlab.ring import ring_allgather_inplace, ring_allreduce_inplace
from ringlab.ring_outofplace import ring_allreduce_into, ring_reduce_scatter_into
from ringlab.schedule import chunk_bounds
from ringlab.settings import parse_transport
from ringlab.transport import CudaAwareMpiTransport, MpiTransport, default_seconds
from ringlab.validate import (InvalidCollectiveCall, agree_checked, check_transport, checked_call,  # noqa: F401
                              environment_checked, prepare_out)

__all__ = ["allreduce", "reduce_scatter", "allgather", "ALLREDUCE_ALGORITHMS", "register_allreduce",
           "stage_through_host", "prepare_out", "check_transport", "collective_call", "IPC_DTYPES"]

# name -> fn(flat_host_buffer, transport, op, cache): in-place all-reduce of host memory.
def _ring(buf, tr, op, cache):
    ring_allreduce_inplace(buf, tr, op, cache=cache)


_ring.into = ring_allreduce_into   # out of place: the input is read, not copied (ring_outofplace.py)
ALLREDUCE_ALGORITHMS = {"ring": _ring}
# reduce_scatter and allgather run the ring (the algo= argument is there for one call shape)
RING_ONLY = ("ring",)
# dtypes the IPC ring's CuPy kernels reduce (bfloat16 device arrays are staged)
IPC_DTYPES = DEVICE_DTYPES
# device-only algorithms: every rank reads every peer's buffers over CUDA IPC (collectives/gpu/ipc_direct.py)
DEVICE_ALGORITHMS = ("oneshot", "twoshot")

_scratch = threading.local()   # per-thread buffers: async collectives run on a progress thread
_state_lock = threading.Lock()


def _cache(name):
    """This thread's scratch dict for ``name`` (receive buffers, pinned staging buffers)."""
    caches = getattr(_scratch, "caches", None)
    if caches is None:
        caches = _scratch.caches = {}
    return caches.setdefault(name, {})


def register_allreduce(name, fn):
    """Add a host all-reduce algorithm ``fn(flat_buffer, transport, op, cache)`` under ``name``.

    ``fn.check(dtype, op)``, if present, runs in the call's local checks (a bad call fails before data moves);
    ``fn.into(x, out, transport, op, cache)``, if present, is the out-of-place form (host arrays).
    """
    ALLREDUCE_ALGORITHMS[name] = fn


class collective_call:
    """``with collective_call(comm, what, timeout) as call:`` one collective on ``comm`` from this process.

    Calls on one communicator are serialized across the process's threads (concurrent collectives on
    one communicator are erroneous MPI; the order they take is checked by validate's thread field).
    Once data moves (``call.moving()``), a failure other than a bad-argument error leaves peers waiting
    in the collective: the communicator is marked failed (a later call raises at once instead of
    pairing with the peers' leftovers) and, unless it was a timeout, this rank keeps MPI alive at
    exit until the peers' timeouts end the job (faults.linger_at_exit).
    """

    __slots__ = ("comm", "what", "timeout", "state", "lock", "_moving", "seconds")

    def __init__(self, comm, what, timeout=None):
        global _last
        self.comm, self.what, self.timeout, self._moving, self.seconds = comm, what, timeout, False, _UNRESOLVED
        last = _last                   # one read: another thread may replace it
        if last[0] is comm:            # the communicator of the previous call: its state, without Get_attr
            self.state, self.lock = last[1], last[2]
            return
        self.state = comm_state(comm)
        self.lock = self.state.get("issue-lock")
        if self.lock is None:
            with _state_lock:
                self.lock = self.state.setdefault("issue-lock", threading.RLock())
        _last = (comm, self.state, self.lock)

    def __enter__(self):
        self.lock.acquire()
        failed = self.state.get("failed-mid-flight")
        if failed is not None:
            self.lock.release()
            raise CollectiveError(f"rank {self.comm.rank}: {self.what} on a communicator whose earlier collective "
                                  f"failed mid-flight ({failed}); its peers' messages may still be in flight, so "
                                  "it cannot be used again")
        return self

    def moving(self):
        self._moving = True

    def __exit__(self, kind, exc, tb):
        try:
            if exc is not None and self._moving and not isinstance(exc, InvalidCollectiveCall):
                self.state["failed-mid-flight"] = f"{self.what}: {type(exc).__name__}: {exc}"
                if not isinstance(exc, CollectiveTimeout):
                    faults.linger_at_exit(self.comm, _seconds_or_default(self.timeout), self.state["failed-mid-flight"])
        finally:
            self.lock.release()


_UNRESOLVED = object()   # collective_call.seconds until validate.checked_call resolves the timeout
_last = (None, None, None)   # (comm, its comm_state, its lock) of the latest collective_call


def _seconds_or_default(timeout):
    try:
        return resolve_timeout(timeout)
    except ValueError:
        return resolve_timeout(None)


def _route(algo, transport):
    """The algo field of the fingerprint: ranks must agree on the algorithm and the transport."""
    return algo if transport is None else f"{algo} via {transport}"


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


def _transport(comm, timeout, kind=MpiTransport, call=None):
    """A ``kind`` transport on ``comm`` with ``timeout`` (None: the transport's default), or with the
    seconds ``call`` already resolved it to (checked_call), so the environment is not read again."""
    if call is not None and call.seconds is not _UNRESOLVED:
        return kind(comm, timeout=call.seconds)
    return kind(comm) if timeout is None else kind(comm, timeout=timeout)


def _check_algo(algo, a, known=None, op="sum"):
    if known is not None:
        if algo not in known:
            raise ValueError(f"unknown algo {algo!r}; available: {', '.join(known)}")
        return
    if algo in DEVICE_ALGORITHMS:
        if not is_device_array(a):
            raise ValueError(f"algo {algo!r} reads peers' GPU memory over CUDA IPC: it needs device (CuPy) arrays")
        if a.dtype.name not in IPC_DTYPES:
            raise TypeError(f"algo {algo!r} supports {', '.join(IPC_DTYPES)}, not {a.dtype.name}")
        return
    if algo not in ALLREDUCE_ALGORITHMS:
        raise ValueError(f"unknown algo {algo!r}; available: {', '.join(sorted(ALLREDUCE_ALGORITHMS))}")
    check = getattr(ALLREDUCE_ALGORITHMS[algo], "check", None)   # an algorithm's own dtype/op limits
    if check is not None:
        check(a.dtype, op)


def allreduce(x, out=None, op="sum", algo="ring", comm=None, timeout=None, validate=True, transport=None):
    """All-reduce ``x`` over ``comm`` (default COMM_WORLD) and return ``out``.

    ``out=None`` allocates, ``out=x`` works in place. ``op``: sum, prod, max, min, avg. Every rank
    ends bitwise identical. ``timeout`` (s) bounds each wait; ``validate=False`` skips the
    cross-rank argument check (for benchmarks). ``transport`` (device arrays): settings.TRANSPORTS
    ("auto", "device" for the persistent-kernel ring, "ipc", "ipc:K" for K pipeline slices, "ipc-host", "ipc-shared",
    "mpi", "staged").
    """
    if (type(x) is np.ndarray and (out is None or type(out) is np.ndarray) and transport is None
            and timeout is None and type(op) is str and type(algo) is str):
        res = _host_allreduce(x, out, op, algo, comm if comm is not None else MPI.COMM_WORLD, validate)
        if res is not None:
            return res
    return _allreduce(x, out, op, algo, comm, timeout, validate, transport)


_FAST_DTYPES = frozenset(SUPPORTED_DTYPES)
_FAST_OPS = frozenset(OPS)


def _host_allreduce(x, out, op, algo, comm, validate):
    """The common call (NumPy in and out, a host algorithm without checks of its own, default timeout) with
    its checks written out: the same signature, agreement and executor as the general path; None hands
    anything else to it (which then reports what is wrong on every rank)."""
    dt, fn = x.dtype, ALLREDUCE_ALGORITHMS.get(algo)
    if (fn is None or hasattr(fn, "check") or op not in _FAST_OPS or dt not in _FAST_DTYPES
            or (op == "avg" and dt.kind in "iu") or not x.flags.c_contiguous or not environment_checked(comm.size)):
        return None
    inplace = out is x
    if out is None:
        res = np.empty(x.shape, dt)
    else:
        flags = out.flags
        if out.dtype != dt or out.shape != x.shape or not flags.c_contiguous or not flags.writeable:
            return None
        res = out
    try:
        seconds = default_seconds()
    except Exception:  # noqa: BLE001 - a bad $RINGLAB_TIMEOUT: the general path reports it on every rank
        return None
    with collective_call(comm, "allreduce") as call:
        state = call.state
        agree_checked(comm, validate, ("allreduce", x.size, dtype_label(dt), op, algo, inplace), seconds, state)
        call.moving()
        tr, into = state.get("host-transport"), getattr(fn, "into", None)
        if tr is None or tr.timeout != seconds:        # one MpiTransport per communicator and timeout
            tr = state["host-transport"] = MpiTransport(comm, timeout=seconds)
        flat = res if res.ndim == 1 else res.reshape(-1)
        if inplace or into is None:        # as the general path: in place (after a copy when out of place)
            if not inplace:
                res[...] = x
            fn(flat, tr, op, _cache(algo))
        else:
            into(x if x.ndim == 1 else x.reshape(-1), flat, tr, op, _cache(algo))
    return res


@returns_input_type   # torch in, torch out (arrays.py)
def _allreduce(x, out=None, op="sum", algo="ring", comm=None, timeout=None, validate=True, transport=None):
    """``allreduce``'s general path: every array type, algorithm and transport; every check, then the agreement."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    box = []

    def local_checks():
        a = as_array(x)
        box.append(a)
        check_op_dtype(op, a.dtype)
        _check_algo(algo, a, op=op)
        check_transport(transport, a, "allreduce")
        return prepare_out(a, out, a.shape, "allreduce")

    def signature():
        a = box[0]
        return "allreduce", a.size, dtype_label(a.dtype), op, _route(algo, transport), out is x
    with collective_call(comm, "allreduce", timeout) as call:
        res = checked_call(comm, validate, signature, local_checks, timeout, "allreduce", call)
        a = box[0]
        call.moving()
        if is_device_array(a) and _device_allreduce(a, res, op, algo, comm, timeout, transport):
            return res
        tr, cache, fn = _transport(comm, timeout, call=call), _cache(algo), ALLREDUCE_ALGORITHMS[algo]
        into = getattr(fn, "into", None)     # an out-of-place form that reads the input instead of copying it
        if res is not a and into is not None and not is_device_array(a) and a.flags.c_contiguous:
            into(a.reshape(-1), res.reshape(-1), tr, op, cache)
            return res
        if res is not a:
            res[...] = a
        stage_through_host(res.reshape(-1), lambda host: fn(host, tr, op, cache))
        return res


def _device_allreduce(a, res, op, algo, comm, timeout, transport):
    """Run a device-native all-reduce of ``a`` into ``res``; False leaves it to host staging."""
    import cupy
    src = a.reshape(-1) if a.flags.c_contiguous else cupy.ascontiguousarray(a).reshape(-1)
    if algo == "auto" and a.dtype.name in IPC_DTYPES:     # one-shot, two-shot or the device ring, by size and N
        from ringlab import settings
        from ringlab.gpu.ipc import ipc_usable
        wanted = parse_transport(transport or settings.get("RINGLAB_TRANSPORT"))[0]
        if wanted in ("auto", "device") and ipc_usable(comm)[0]:
            from ringlab.gpu.device_small import device_auto_choice
            algo = device_auto_choice(comm, src.nbytes)     # the same on every rank (rank 0's table)
            transport = "device" if algo == "ring" else transport
    if algo in DEVICE_ALGORITHMS:
        from ringlab.gpu.device_small import CAPACITY, get_device_small
        from ringlab.gpu.ipc import ipc_usable
        from ringlab.gpu.ipc_direct import get_ipc_direct
        usable, why = ipc_usable(comm)
        if not usable:
            raise ValueError(f"algo {algo!r} needs CUDA IPC between all ranks, which is unusable here: {why}")
        if src.nbytes <= CAPACITY:     # persistent kernels (without co-residency they use ipc_direct themselves)
            get_device_small(comm, algo, timeout).allreduce(src, res.reshape(-1), op, timeout=timeout)
        else:                          # above the scratch mapped once: the host-driven kernels
            get_ipc_direct(comm, algo).allreduce(src, res.reshape(-1), op, timeout)
        return True
    if algo != "ring":
        return False
    name, slices, _ = select_transport(comm, transport)
    if name == "device" and a.dtype.name in IPC_DTYPES:
        from ringlab.gpu.device_ring import get_device_ring
        get_device_ring(comm, timeout).allreduce(src, res.reshape(-1), op, timeout=timeout)
        return True
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


def _device_ring_transport(comm, transport, what):
    """For reduce_scatter / allgather on device arrays: 'mpi' (the ring on device memory) or 'staged'.

    Neither has a CUDA IPC executor yet: an explicit IPC transport is an error, auto falls back.
    """
    name, _, _ = select_transport(comm, transport)
    if name in ("device", "ipc", "ipc-host", "ipc-shared"):
        if transport is not None and parse_transport(transport)[0] != "auto":
            raise ValueError(f"{what} has no CUDA IPC path yet: use transport 'mpi' (CUDA-aware MPI) or 'staged'")
        name = "mpi" if cuda_aware_mpi(comm) else "staged"
    return name


@returns_input_type   # torch in, torch out (arrays.py)
def reduce_scatter(x, out=None, op="sum", algo="ring", comm=None, timeout=None, validate=True, transport=None):
    """Reduce ``x`` (same size on every rank); return this rank's chunk of the result, flat:
    elements ``chunk_bounds(x.size, N)[rank]`` (sizes differ by at most one across ranks).

    ``x`` is only read (peak memory: x + 2 chunks). ``algo``: "ring"; ``transport`` as for allreduce.
    """
    comm = comm if comm is not None else MPI.COMM_WORLD
    box = []

    def local_checks():
        a = as_array(x)
        box.append(a)
        check_op_dtype(op, a.dtype)
        _check_algo(algo, a, RING_ONLY)
        check_transport(transport, a, "reduce_scatter")
        lo, hi = chunk_bounds(a.size, comm.size)[comm.rank]
        return prepare_out(a, out, (hi - lo,), "reduce_scatter")

    def signature():
        a = box[0]
        return "reduce_scatter", a.size, dtype_label(a.dtype), op, _route(algo, transport), False
    with collective_call(comm, "reduce_scatter", timeout) as call:
        res = checked_call(comm, validate, signature, local_checks, timeout, "reduce_scatter", call)
        a = box[0]
        call.moving()
        flat = a.reshape(-1)       # a copy only when x is not contiguous
        if is_device_array(a) and _device_ring_transport(comm, transport, "reduce_scatter") == "mpi":
            ring_reduce_scatter_into(flat, res, _transport(comm, timeout, CudaAwareMpiTransport), op,
                                     _cache("reduce_scatter-device"))
            return res
        tr, cache = _transport(comm, timeout, call=call), _cache("reduce_scatter")
        if not is_device_array(a):
            ring_reduce_scatter_into(flat, res, tr, op, cache)
            return res
        host_out = np.empty(res.shape, dtype=res.dtype)
        stage_through_host(flat, lambda host: ring_reduce_scatter_into(host, host_out, tr, op, cache))
        res.set(host_out)
        return res


@returns_input_type   # torch in, torch out (arrays.py)
def allgather(x, out=None, *, algo="ring", comm=None, timeout=None, validate=True, transport=None):
    """Gather ``x`` (same shape on every rank) from all ranks: ``out[r]`` is rank r's ``x``.

    No ``op``: everything after ``out`` is keyword-only, so no argument lands in another's place.
    """
    comm = comm if comm is not None else MPI.COMM_WORLD
    box = []

    def local_checks():
        a = as_array(x)
        box.append(a)
        check_op_dtype("sum", a.dtype)
        _check_algo(algo, a, RING_ONLY)
        check_transport(transport, a, "allgather")
        return prepare_out(a, out, (comm.size,) + tuple(a.shape), "allgather")

    def signature():
        a = box[0]
        return "allgather", a.size, dtype_label(a.dtype), "-", _route(algo, transport), False
    with collective_call(comm, "allgather", timeout) as call:
        res = checked_call(comm, validate, signature, local_checks, timeout, "allgather", call)
        a = box[0]
        call.moving()
        res[comm.rank] = a
        if is_device_array(a) and _device_ring_transport(comm, transport, "allgather") == "mpi":
            ring_allgather_inplace(res.reshape(-1), _transport(comm, timeout, CudaAwareMpiTransport), rotate=-1)
            return res
        tr = _transport(comm, timeout, call=call)
        stage_through_host(res.reshape(-1), lambda host: ring_allgather_inplace(host, tr, rotate=-1))
        return res
