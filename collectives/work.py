"""Non-blocking collectives: ``allreduce_async`` etc. return a ``Work`` you ``wait()`` on later.

    work = allreduce_async(grad)          # returns at once
    loss = independent_compute()          # the collective progresses meanwhile
    grad_sum = work.wait()                # re-raises any error of the collective

Design (docs/overlap.md has the picture):
- One background *progress thread* per process runs the blocking collectives of ``api`` (whose
  scratch buffers are per thread, so blocking calls from the caller's thread never share them) in
  issue order (FIFO), like NCCL's one stream per communicator. The caller's thread never blocks
  on communication, so MPI progresses while it computes (NumPy releases the GIL in large ops).
- Each parent communicator gets one private duplicate (``Dup``, made once in the caller's thread
  because it is itself a collective). Async traffic therefore never matches the caller's own
  blocking traffic on ``comm``; async collectives run one at a time on that duplicate, and MPI's
  non-overtaking rule keeps back-to-back ones apart. Every rank must issue them in the same order.
- CuPy arrays: the caller's stream records a *ready* event; the progress thread makes a private
  communication stream wait on it and runs the API's device path there (the IPC ring, or pinned
  staging where IPC is unusable), then records a *done* event on that stream. ``wait()`` makes the
  caller's current stream wait on *done*; the caller's host thread never blocks on the transfer.
"""
import atexit
import itertools
import queue
import threading
import time

from mpi4py import MPI

from ringlab import api
from ringlab.commstate import comm_state
from ringlab.arrays import (as_array, caller_stream, is_device_array, is_torch_tensor, on_torch_stream, to_torch,
                            torch_cuda_device)
from ringlab.errors import CollectiveTimeout, default_timeout
from ringlab.validate import issued_by

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
        self._futures = []        # torch futures handed out by get_future() before the end
        self._torch = None        # torch.device of a CUDA tensor of the call: wait() orders torch's current stream

    def _finish(self, result=None, error=None, done_event=None):
        self._result, self._error, self._done_event = result, error, done_event
        self.finished_at = time.perf_counter()
        self._finished.set()
        self._complete_futures()

    def get_future(self):
        """A ``torch.futures.Future`` whose value is the result as a torch tensor (same memory).

        Completed by the progress thread when the collective ends (no thread per call); an error
        becomes the future's exception. A device result is final on the device by then.
        """
        import torch
        fut = torch.futures.Future()
        with _future_lock:   # _finish sets the event before taking the list: no future is missed
            if not self._finished.is_set():
                self._futures.append(fut)
                return fut
        self._complete_future(fut, on_progress_thread=False)
        return fut

    def _complete_futures(self):
        with _future_lock:
            futures, self._futures = self._futures, []
        for fut in futures:
            try:
                self._complete_future(fut, on_progress_thread=True)
            except Exception as exc:  # never leave a future pending: its waiter would hang
                fut.set_exception(exc)

    def _complete_future(self, fut, on_progress_thread):
        if self._error is not None:
            fut.set_exception(self._error)
            return
        if self._done_event is not None:
            if on_progress_thread:       # the progress thread may block; readers on any stream are then safe
                self._done_event.synchronize()
            else:                         # the caller's thread: order its stream after the result instead
                caller_stream(self._torch).wait_event(self._done_event)
        result = self._result
        fut.set_result(result if is_torch_tensor(result) else to_torch(result))

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
            caller_stream(self._torch).wait_event(self._done_event)
        self._keep = ()
        return self._result

    def __repr__(self):
        state = "failed" if self._error is not None else ("done" if self.test() else "in flight")
        return f"<Work {self.what} #{self.seq} {state}>"


class _ProgressThread:
    """A daemon thread that runs submitted jobs one by one, in submission order (one per communicator)."""

    def __init__(self):
        self._jobs = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name=f"ringlab-progress-{len(_engines)}", daemon=True)
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
_future_lock = threading.Lock()   # Work._futures, shared by the caller and the progress thread
_engines = []    # one progress thread per async communicator, like NCCL's one stream per communicator
_seq = itertools.count()


def _check_thread_level():
    provided = MPI.Query_thread()
    if provided < MPI.THREAD_MULTIPLE:
        names = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled", MPI.THREAD_SERIALIZED: "serialized"}
        raise RuntimeError(
            f"async collectives call MPI from a progress thread and need MPI_THREAD_MULTIPLE, but MPI was "
            f"initialized with MPI_THREAD_{names.get(provided, provided).upper()}: leave mpi4py.rc.thread_level "
            "at 'multiple' (the default) before importing mpi4py.MPI, and use an MPI built with thread support")


def _progress(pcomm):
    """The progress thread of the private communicator ``pcomm``: collectives on two communicators
    never queue behind each other (one thread for all could deadlock when ranks interleave them)."""
    with _lock:
        state = comm_state(pcomm)
        if "progress" not in state:
            _check_thread_level()
            if not _engines:
                atexit.register(_shutdown)   # runs before mpi4py's MPI_Finalize (registered earlier)
            state["progress"] = _ProgressThread()
            _engines.append(state["progress"])
        return state["progress"]


def _shutdown():
    # Bounded: a job stuck on a dead peer gives up after its own timeout anyway.
    while _engines:
        _engines.pop().stop(default_timeout())


def async_comm(comm):
    """The private duplicate of ``comm`` that async collectives on ``comm`` run on (made once).

    Collective over ``comm``: the first async call on a communicator must happen on every rank.
    """
    with _lock:
        state = comm_state(comm)   # lives as long as comm (a freed handle may be reused by MPI)
        if "async-dup" not in state:
            with api.collective_call(comm, "the first async collective (comm.Dup)"):  # not beside another call
                state["async-dup"] = comm.Dup()
        return state["async-dup"]


def _as_array_or_raw(x):
    """``as_array(x)``, or ``x`` itself when it is no buffer: the API's checked conversion then
    rejects it on every rank together (a local raise here would desynchronize the ranks).
    A CUDA tensor is viewed on torch's current stream (no cross-stream wait)."""
    try:
        device = torch_cuda_device(x)
        if device is not None:
            with on_torch_stream(device):
                return as_array(x)
        return as_array(x)
    except Exception:  # noqa: BLE001 - reported by the collective's argument agreement
        return x


def _launch(what, comm, run, x, keep=(), origin=None):
    """Queue ``run(private_comm)`` on the progress thread; device arrays run on the comm stream, after the
    caller's stream (torch's current one when ``origin``, the caller's x, or ``out`` is a CUDA tensor)."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    pcomm = async_comm(comm)
    engine = _progress(pcomm)
    work = Work(what, next(_seq), keep=(x,) + tuple(keep))
    work._torch = torch_cuda_device(origin, *keep)
    # The argument agreement compares the issuing thread's name, not the progress thread's: two
    # threads whose calls pair up in different orders on different ranks raise, never mix data.
    issuer = threading.current_thread().name

    def issued():
        with issued_by(issuer):
            return run(pcomm)
    if is_device_array(x):
        import cupy
        ready = cupy.cuda.Event(block=False, disable_timing=True)
        ready.record(caller_stream(work._torch))   # the input is final once this point is reached
        device = x.device.id        # the array's GPU (a torch tensor's may not be CuPy's current device)
        engine.submit(work, lambda: _on_comm_stream(ready, device, issued))
    else:
        engine.submit(work, lambda: (issued(), None))
    return work


# ---- device arrays: the blocking API, on the communication stream ------------------------------

_comm_streams = {}


def _comm_stream(device):
    """The communication stream of ``device`` (non-blocking w.r.t. the legacy default stream). Default
    priority: a highest-priority stream made the TP overlap worse on the H200 (docs/overlap.md)."""
    import cupy
    if device not in _comm_streams:
        _comm_streams[device] = cupy.cuda.Stream(non_blocking=True)
    return _comm_streams[device]


def _on_comm_stream(ready, device, run):
    """Run ``run()`` (a blocking API call) with the communication stream current, after ``ready``.

    The API's device paths (IPC rings, or pinned staging) order their work after the current
    stream, so they start only once the caller's input is final; ``done`` marks the result.
    """
    import cupy
    with cupy.cuda.Device(device):
        stream = _comm_stream(device)
        stream.wait_event(ready)
        with stream:
            result = run()
        done = cupy.cuda.Event(block=False, disable_timing=True)
        done.record(stream)
        return result, done


# ---- public API ---------------------------------------------------------------------------------

def allreduce_async(x, out=None, op="sum", algo="ring", comm=None, timeout=None, validate=True, transport=None):
    """Non-blocking ``api.allreduce`` (same arguments); ``wait()`` returns ``out``.

    ``x`` must not be modified, nor ``out`` read, until ``wait()`` returns (as with MPI_Iallreduce).
    """
    a = _as_array_or_raw(x)
    inplace = out is x

    def run(pcomm):
        return api.allreduce(a, out=a if inplace else out, op=op, algo=algo, comm=pcomm, timeout=timeout,
                             validate=validate, transport=transport)
    return _launch("allreduce", comm, run, a, keep=(out,), origin=x)


def reduce_scatter_async(x, out=None, op="sum", algo="ring", comm=None, timeout=None, validate=True,
                         transport=None):
    """Non-blocking ``api.reduce_scatter`` (same arguments); ``wait()`` returns this rank's chunk."""
    a = _as_array_or_raw(x)
    return _launch("reduce_scatter", comm, lambda pcomm: api.reduce_scatter(
        a, out=out, op=op, algo=algo, comm=pcomm, timeout=timeout, validate=validate, transport=transport),
        a, keep=(out,), origin=x)


def allgather_async(x, out=None, *, algo="ring", comm=None, timeout=None, validate=True, transport=None):
    """Non-blocking ``api.allgather`` (same arguments); ``wait()`` returns ``out`` (``out[r]`` = rank r's x)."""
    a = _as_array_or_raw(x)
    return _launch("allgather", comm, lambda pcomm: api.allgather(
        a, out=out, algo=algo, comm=pcomm, timeout=timeout, validate=validate, transport=transport),
        a, keep=(out,), origin=x)
