"""Non-blocking collectives: ``allreduce_async`` etc. return a ``Work`` you ``wait()`` on later.

    work = allreduce_async(grad)          # returns at once
    loss = independent_compute()          # the collective progresses meanwhile
    grad_sum = work.wait()                # re-raises any error of the collective

Design (docs/overlap.md has the picture):
- One background *progress thread* per process runs the collectives of ``api`` (with its own
  scratch buffers, so blocking calls from the caller's thread never share them) in
  issue order (FIFO), like NCCL's one stream per communicator. The caller's thread never blocks
  on communication, so MPI progresses while it computes (NumPy releases the GIL in large ops).
- Each parent communicator gets one private duplicate (``Dup``, made once in the caller's thread
  because it is itself a collective). Async traffic therefore never matches the caller's own
  blocking traffic on ``comm``; async collectives run one at a time on that duplicate, and MPI's
  non-overtaking rule keeps back-to-back ones apart. Every rank must issue them in the same order.
- CuPy arrays: the caller's stream records a *ready* event; the progress thread makes a private
  communication stream wait on it, stages the bytes through pinned host memory (MPI here is not
  CUDA-aware), and queues the copy back plus a *done* event on the communication stream.
  ``wait()`` then makes the caller's current stream wait on *done* instead of blocking the host
  on the GPU copy. A device-native executor would record *done* at launch and never block the host.
"""
import atexit
import itertools
import queue
import threading
import time

import numpy as np
from mpi4py import MPI

from . import api
from .arrays import as_array, is_device_array
from .errors import CollectiveTimeout, default_timeout
from .ops import check_op_dtype
from .ring import ring_reduce_scatter_inplace
from .schedule import chunk_bounds
from .validate import checked_call

__all__ = ["Work", "allreduce_async", "reduce_scatter_async", "allgather_async", "async_comm"]


class Work:
    """Handle of one collective in flight: ``wait(timeout)``, ``test()``, ``done``.

    ``started_at`` / ``finished_at`` are ``time.perf_counter()`` stamps taken by the progress
    thread when it began and finished the collective (None until then), so a caller can prove
    the collective ran while it was computing.
    """

    def __init__(self, what, seq, keep=()):
        self.what, self.seq = what, seq
        self.started_at = self.finished_at = None
        self._finished = threading.Event()
        self._result = self._error = None
        self._done_event = None   # CUDA event on the communication stream (device arrays only)
        self._keep = keep         # buffers that must outlive the transfer (device inputs, outputs)

    def _finish(self, result=None, error=None, done_event=None):
        self._result, self._error, self._done_event = result, error, done_event
        self.finished_at = time.perf_counter()
        self._finished.set()

    def test(self):
        """True when the collective has finished (successfully or not); never blocks or raises."""
        if not self._finished.is_set():
            return False
        return self._done_event is None or self._done_event.done

    @property
    def done(self):
        return self.test()

    def wait(self, timeout=None):
        """Return the result once done; re-raise its error; CollectiveTimeout after ``timeout`` s.

        A timed-out collective keeps running in the background: calling ``wait`` again is fine.
        For device arrays the caller's current stream is made to wait on the result (no host
        block on the copy back), so kernels queued after ``wait()`` see the result.
        """
        if not self._finished.wait(timeout):
            raise CollectiveTimeout(f"rank {MPI.COMM_WORLD.rank}: async {self.what} #{self.seq} not done "
                                    f"within {timeout:g} s (it keeps running; wait again, or check the peers)")
        if self._error is not None:
            raise self._error
        if self._done_event is not None:
            import cupy
            cupy.cuda.get_current_stream().wait_event(self._done_event)
        self._keep = ()
        return self._result

    def __repr__(self):
        state = "failed" if self._error is not None else ("done" if self.test() else "in flight")
        return f"<Work {self.what} #{self.seq} {state}>"


class _ProgressThread:
    """A daemon thread that runs submitted jobs one by one, in submission order."""

    def __init__(self):
        self._jobs = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="ringlab-progress", daemon=True)
        self._thread.start()

    def submit(self, work, job):
        self._jobs.put((work, job))

    def _loop(self):
        while True:
            item = self._jobs.get()
            if item is None:
                return
            work, job = item
            work.started_at = time.perf_counter()
            try:
                result, done_event = job()
                work._finish(result=result, done_event=done_event)
            except BaseException as exc:  # any failure belongs to the caller, raised at wait()
                work._finish(error=exc)

    def stop(self, timeout=None):
        """Finish the queued jobs (every rank runs them), then end the thread."""
        self._jobs.put(None)
        self._thread.join(timeout)


_lock = threading.Lock()
_engine = None
_dups = {}                 # parent comm handle -> (parent, private duplicate)
_seq = itertools.count()


def _check_thread_level():
    provided = MPI.Query_thread()
    if provided < MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized"}
        raise RuntimeError(
            f"async collectives call MPI from a progress thread and need MPI_THREAD_MULTIPLE, but MPI was "
            f"initialized with MPI_THREAD_{names.get(provided, provided).upper()}: leave mpi4py.rc.thread_level "
            "at 'multiple' (the default) before importing mpi4py.MPI, and use an MPI built with thread support")


def _progress():
    global _engine
    with _lock:
        if _engine is None:
            _check_thread_level()
            _engine = _ProgressThread()
            atexit.register(_shutdown)   # runs before mpi4py's MPI_Finalize (registered earlier)
        return _engine


def _shutdown():
    global _engine
    if _engine is not None:
        # Bounded: a job stuck on a dead peer gives up after its own timeout anyway.
        _engine.stop(default_timeout())
        _engine = None


def async_comm(comm):
    """The private duplicate of ``comm`` that async collectives on ``comm`` run on (made once).

    Collective over ``comm``: the first async call on a communicator must happen on every rank.
    """
    key = comm.py2f()
    with _lock:
        entry = _dups.get(key)
        if entry is None:
            entry = (comm, comm.Dup())
            _dups[key] = entry
    return entry[1]


def _launch(what, comm, host_job, device_job, x, keep=()):
    """Submit ``host_job(pcomm)`` or, for device arrays, ``device_job(pcomm, ready_event)``."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    engine = _progress()
    pcomm = async_comm(comm)
    work = Work(what, next(_seq), keep=(x,) + tuple(keep))
    if is_device_array(x):
        import cupy
        ready = cupy.cuda.Event(block=False, disable_timing=True)
        ready.record(cupy.cuda.get_current_stream())   # the input is final once this point is reached
        device = cupy.cuda.Device().id
        engine.submit(work, lambda: device_job(pcomm, ready, device))
    else:
        engine.submit(work, lambda: (host_job(pcomm), None))
    return work


# ---- host execution with the progress thread's own scratch ---------------------------------------
# api keeps module-level scratch buffers (``api._caches``) for the caller's blocking collectives;
# sharing them with the progress thread would let a blocking and an async ring overwrite each
# other's receive buffer. These mirror api.allreduce / api.reduce_scatter with a private cache.

_scratch = {}


def _run_allreduce(a, out, op, algo, comm, timeout, validate, inplace):
    def local_checks():
        check_op_dtype(op, a.dtype)
        api._check_algo(algo, a)
        return api._prepare_out(a, out, a.shape, "allreduce")
    res = checked_call(comm, validate, ("allreduce", a.size, a.dtype.name, op, algo, inplace), local_checks)
    if res is not a:
        res[...] = a
    api.ALLREDUCE_ALGORITHMS[algo](res.reshape(-1), api._transport(comm, timeout), op, _scratch.setdefault(algo, {}))
    return res


def _run_reduce_scatter(a, out, op, comm, timeout, validate):
    n = comm.size
    lo, hi = chunk_bounds(a.size, n)[comm.rank]

    def local_checks():
        check_op_dtype(op, a.dtype)
        return api._prepare_out(a, out, (hi - lo,), "reduce_scatter")
    res = checked_call(comm, validate, ("reduce_scatter", a.size, a.dtype.name, op, "ring", False), local_checks)
    work = a.reshape(-1).copy()   # the ring reduces in place; the caller's input stays intact
    # rotate=-1: rank r ends owning chunk r, as in api.reduce_scatter.
    ring_reduce_scatter_inplace(work, api._transport(comm, timeout), op, rotate=-1,
                                cache=_scratch.setdefault("reduce_scatter", {}))
    if op == "avg":
        np.divide(work[lo:hi], n, out=work[lo:hi], casting="unsafe")
    res[...] = work[lo:hi]
    return res


# ---- CuPy staging on the communication stream ------------------------------------------------------

_comm_streams = {}
_pinned = {}


def _comm_stream(device):
    """The communication stream of ``device`` (non-blocking w.r.t. the legacy default stream)."""
    import cupy
    if device not in _comm_streams:
        _comm_streams[device] = cupy.cuda.Stream(non_blocking=True)
    return _comm_streams[device]


def _pinned_host(role, nbytes, dtype, stream):
    """A pinned host buffer for ``role`` ('in'/'out'), reused FIFO by the progress thread.

    Reuse is safe because the thread synchronizes the communication stream (after each D2H
    copy) before the host touches pinned memory again, and all copies run on that one stream.
    """
    import cupyx
    buf = _pinned.get(role)
    if buf is None or buf.nbytes < nbytes:
        stream.synchronize()   # no copy from the old buffer may still be in flight when it is freed
        buf = cupyx.empty_pinned(max(nbytes, 1), dtype=np.uint8)
        _pinned[role] = buf
    return buf[:nbytes].view(dtype)


def _staged(pcomm, ready, device, x, out, signature, local_error, run_host, host_out_shape):
    """Stage ``x`` to pinned host memory, run ``run_host(host_in, host_out)``, queue the copy to ``out``."""
    import cupy
    with cupy.cuda.Device(device):
        stream = _comm_stream(device)

        def local_checks():
            if local_error is not None:
                raise local_error
        checked_call(pcomm, signature[-1], signature[:-1], local_checks)
        stream.wait_event(ready)
        flat_x = x.reshape(-1)
        host_in = _pinned_host("in", flat_x.nbytes, x.dtype, stream)
        flat_x.get(stream=stream, out=host_in)          # blocking: the host needs the bytes for MPI
        host_out = host_in if host_out_shape is None else \
            _pinned_host("out", int(np.prod(host_out_shape)) * x.dtype.itemsize, x.dtype, stream).reshape(host_out_shape)
        run_host(host_in, host_out)
        out.reshape(-1).set(host_out.reshape(-1), stream=stream)   # async from pinned memory
        done = cupy.cuda.Event(block=False, disable_timing=True)
        done.record(stream)
        return out, done


def _device_out(a, out, shape, what):
    """(out array, None) or (None, error): errors are agreed on across ranks, not raised here."""
    try:
        return api._prepare_out(a, out, shape, what), None
    except (TypeError, ValueError) as exc:
        return None, exc


# ---- public API ---------------------------------------------------------------------------------

def allreduce_async(x, out=None, op="sum", algo="ring", comm=None, timeout=None, validate=True):
    """Non-blocking ``api.allreduce`` (same arguments); ``wait()`` returns ``out``.

    ``x`` must not be modified, nor ``out`` read, until ``wait()`` returns (as with MPI_Iallreduce).
    """
    a = as_array(x)

    def host_job(pcomm):
        return _run_allreduce(a, out, op, algo, pcomm, timeout, validate, out is x)

    if not is_device_array(a):
        return _launch("allreduce", comm, host_job, None, a)
    import cupy
    a = cupy.ascontiguousarray(a)
    res, err = _device_out(a, out, a.shape, "allreduce")
    if err is None:
        try:
            check_op_dtype(op, a.dtype)
        except (TypeError, ValueError) as exc:
            err = exc
    if err is None and algo not in api.ALLREDUCE_ALGORITHMS:
        err = ValueError(f"unknown algo {algo!r} for the staged async path; available: "
                         f"{', '.join(sorted(api.ALLREDUCE_ALGORITHMS))}")
    sig = ("allreduce", a.size, a.dtype.name, op, algo, out is x, validate)

    def device_job(pcomm, ready, device):
        run = lambda h, _: _run_allreduce(h, h, op, algo, pcomm, timeout, False, True)
        return _staged(pcomm, ready, device, a, res, sig, err, run, None)
    return _launch("allreduce", comm, None, device_job, a, keep=(res,))


def reduce_scatter_async(x, out=None, op="sum", comm=None, timeout=None, validate=True):
    """Non-blocking ``api.reduce_scatter`` (same arguments); ``wait()`` returns this rank's chunk."""
    a = as_array(x)

    def host_job(pcomm):
        return _run_reduce_scatter(a, out, op, pcomm, timeout, validate)

    if not is_device_array(a):
        return _launch("reduce_scatter", comm, host_job, None, a)
    import cupy
    c = comm if comm is not None else MPI.COMM_WORLD
    a = cupy.ascontiguousarray(a)
    lo, hi = chunk_bounds(a.size, c.size)[c.rank]
    res, err = _device_out(a, out, (hi - lo,), "reduce_scatter")
    if err is None:
        try:
            check_op_dtype(op, a.dtype)
        except (TypeError, ValueError) as exc:
            err = exc
    sig = ("reduce_scatter", a.size, a.dtype.name, op, "ring", False, validate)

    def device_job(pcomm, ready, device):
        run = lambda h, o: _run_reduce_scatter(h, o, op, pcomm, timeout, False)
        return _staged(pcomm, ready, device, a, res, sig, err, run, (hi - lo,))
    return _launch("reduce_scatter", comm, None, device_job, a, keep=(res,))


def allgather_async(x, out=None, comm=None, timeout=None, validate=True):
    """Non-blocking ``api.allgather`` (same arguments); ``wait()`` returns ``out`` (``out[r]`` = rank r's x)."""
    a = as_array(x)

    def host_job(pcomm):
        return api.allgather(a, out=out, comm=pcomm, timeout=timeout, validate=validate)

    if not is_device_array(a):
        return _launch("allgather", comm, host_job, None, a)
    import cupy
    c = comm if comm is not None else MPI.COMM_WORLD
    a = cupy.ascontiguousarray(a)
    shape = (c.size,) + tuple(a.shape)
    res, err = _device_out(a, out, shape, "allgather")
    if err is None:
        try:
            check_op_dtype("sum", a.dtype)
        except (TypeError, ValueError) as exc:
            err = exc
    sig = ("allgather", a.size, a.dtype.name, "-", "ring", False, validate)

    def device_job(pcomm, ready, device):
        run = lambda h, o: api.allgather(h.reshape(a.shape), out=o, comm=pcomm, timeout=timeout, validate=False)
        return _staged(pcomm, ready, device, a, res, sig, err, run, shape)
    return _launch("allgather", comm, None, device_job, a, keep=(res,))
