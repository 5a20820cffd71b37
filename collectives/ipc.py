"""CUDA IPC ring: GPU ranks of one node read their left neighbour's device memory directly.

MPI is only the control plane (handles, small metadata). Each ring step is one fused kernel that
reads the peer's chunk and the local input and writes the local output once (reduce-scatter), or a
device copy (all-gather). Cross-process ordering is done on the GPU: every rank owns a progress
counter in device memory; after each slice it bumps the counter with cuStreamWriteValue32, and
before a slice it waits on its neighbours' counters with cuStreamWaitValue32, so no host round trip
sits between steps. ``sync="host"`` replaces that with a stream sync + barrier per step (slow,
obviously correct, and the fallback where stream memory operations are missing).

    reduce-scatter step s (rank r pulls from r-1):  out[c] = src[c] (op) left[c],  c = (r-s-1) mod N
        left = left's src at s = 0 (nothing reduced yet), left's out afterwards
    all-gather step s:                               out[c] = left.out[c],          c = (r-s) mod N

Ordering rules, in slices of the counter (K slices per step, the first "step" is the call's start):
    read-after-write : slice k of step j waits until left finished slice k of step j-1
    write-after-read : all-gather step s waits until right finished reduce-scatter step s (it read
                       the chunk that step overwrites), and a call completes only when right has
                       finished it too (right reads our src and out, which the caller may reuse)
"""
import atexit
import os
import time
from collections import OrderedDict

import numpy as np
from mpi4py import MPI

from .errors import CollectiveTimeout, default_timeout
from .schedule import chunk_bounds

__all__ = ["IpcRing", "ipc_usable", "get_ipc_ring", "close_all"]

_EXPR = {
    "sum": "out = a + b",
    "avg": "out = a + b",
    "prod": "out = a * b",
    "max": "out = (b > a || b != b) ? b : a",   # NaN propagates like numpy.maximum
    "min": "out = (b < a || b != b) ? b : a",
}
_kernels = {}
_rings = {}


def _kernel(op, last_avg=False):
    """out = a (op) b, elementwise, one read of each input and one write (CuPy-compiled, cached)."""
    import cupy
    key = (op, last_avg)
    if key not in _kernels:
        if last_avg:
            _kernels[key] = cupy.ElementwiseKernel("T a, T b, T n", "T out", "out = (a + b) / n", "ringlab_avg_last")
        else:
            _kernels[key] = cupy.ElementwiseKernel("T a, T b", "T out", _EXPR[op], f"ringlab_{op}")
    return _kernels[key]


def _driver():
    from cuda.bindings import driver
    return driver


def _check(result, what):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: CUresult {int(err)}")
    return result[1:] if isinstance(result, tuple) and len(result) > 1 else None


def _wrap(ptr, count, dtype, owner):
    import cupy
    mem = cupy.cuda.UnownedMemory(int(ptr), max(count * np.dtype(dtype).itemsize, 1), owner,
                                  cupy.cuda.Device().id)
    return cupy.ndarray((count,), dtype, cupy.cuda.MemoryPointer(mem, 0))


def ipc_usable(comm):
    """(True, why) when every rank has a GPU and all ranks share one node; same answer everywhere."""
    from .arrays import cupy_or_none
    ok, why = 1, "all ranks on one node with GPUs"
    if cupy_or_none() is None:
        ok, why = 0, "no GPU"
    else:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        if node.size != comm.size:
            ok, why = 0, "ranks span several nodes"
        node.Free()
        try:
            _driver()
        except ImportError:
            ok, why = 0, "cuda-bindings (cuda-python) is not installed"
    if comm.allreduce(ok, op=MPI.MIN) == 0:
        return False, why if not ok else "not usable on another rank"
    return True, why


class IpcRing:
    """Ring all-reduce over CUDA IPC for one communicator. Collective: create and use on all ranks."""

    def __init__(self, comm, slices=1, sync="stream", timeout=None):
        import cupy
        self.comm, self.slices, self.timeout = comm, int(slices), timeout if timeout is not None else default_timeout()
        if self.slices < 1:
            raise ValueError(f"slices must be >= 1, got {slices}")
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.progress = 0                      # value our counter reaches after all enqueued work
        self.opened = OrderedDict()            # peer handle bytes -> our mapping of its base
        n, r = comm.size, comm.rank
        self.counter = cupy.cuda.runtime.malloc(512) if n > 1 else 0
        if n > 1:
            cupy.cuda.runtime.memset(self.counter, 0, 512)
            cupy.cuda.runtime.deviceSynchronize()
        handles = comm.allgather(cupy.cuda.runtime.ipcGetMemHandle(self.counter) if n > 1 else None)
        self.left, self.right = (r - 1) % n, (r + 1) % n
        self.left_counter = self._open(handles[self.left]) if n > 1 else 0
        self.right_counter = self._open(handles[self.right]) if n > 1 else 0
        self.sync = sync
        if n > 1 and sync == "stream":
            ok = 1
            try:  # the driver must accept stream memory operations on this device
                self._write(self.counter, 0)
                self._wait(self.counter, 0)
                self.stream.synchronize()
            except Exception:
                ok = 0
            if comm.allreduce(ok, op=MPI.MIN) == 0:
                self.sync = "host"
        comm.Barrier()

    # -- plumbing ---------------------------------------------------------------------------------
    def _open(self, handle):
        import cupy
        if handle not in self.opened:
            self.opened[handle] = cupy.cuda.runtime.ipcOpenMemHandle(handle)
            while len(self.opened) > 64:                # bounded cache of peer mappings
                old, ptr = self.opened.popitem(last=False)
                if ptr not in (getattr(self, "left_counter", None), getattr(self, "right_counter", None)):
                    cupy.cuda.runtime.ipcCloseMemHandle(ptr)
        else:
            self.opened.move_to_end(handle)
        return self.opened[handle]

    def _export(self, arr):
        """(handle of the allocation holding ``arr``, byte offset of ``arr`` in it)."""
        import cupy
        d = _driver()
        base, _size = _check(d.cuMemGetAddressRange(d.CUdeviceptr(arr.data.ptr)), "cuMemGetAddressRange")
        base = int(base)
        return cupy.cuda.runtime.ipcGetMemHandle(base), arr.data.ptr - base

    def _write(self, addr, value):
        d = _driver()
        _check(d.cuStreamWriteValue32(d.CUstream(self.stream.ptr), d.CUdeviceptr(addr), value & 0xFFFFFFFF,
                                      d.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT), "cuStreamWriteValue32")

    def _wait(self, addr, value):
        d = _driver()
        _check(d.cuStreamWaitValue32(d.CUstream(self.stream.ptr), d.CUdeviceptr(addr), value & 0xFFFFFFFF,
                                     d.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ), "cuStreamWaitValue32")

    def _step_done(self, value):
        if self.sync == "stream":
            self._write(self.counter, value)
        else:
            self.stream.synchronize()
            self.comm.Barrier()

    # -- the collective ---------------------------------------------------------------------------
    def allreduce(self, src, out, op="sum"):
        """out = reduction of every rank's ``src`` (flat, contiguous, same size and dtype everywhere)."""
        import cupy
        comm, n, r, K = self.comm, self.comm.size, self.comm.rank, self.slices
        caller = cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(caller)
        self.stream.wait_event(ready)
        if src.size == 0:
            return True
        if n == 1:
            with self.stream:
                if out.data.ptr != src.data.ptr:
                    out[...] = src
            return self._finish(caller)
        # Control plane: one allgather of (src, out) handles; mappings are cached across calls.
        mine = (self._export(src), self._export(out))
        theirs = comm.allgather(mine)[self.left]
        left_src = _wrap(self._open(theirs[0][0]) + theirs[0][1], src.size, src.dtype, self)
        left_out = _wrap(self._open(theirs[1][0]) + theirs[1][1], src.size, src.dtype, self)
        bounds = chunk_bounds(src.size, n)
        base = self.progress
        item = src.dtype.itemsize
        with self.stream:
            if self.sync == "stream":
                self._wait(self.right_counter, base)      # right finished reading our buffers last call
            self._step_done(base + K)                      # step 0: "my input is ready"
            for j in range(1, 2 * n - 1):
                rs = j <= n - 1
                s = j - 1 if rs else j - n
                c = (r - s - 1) % n if rs else (r - s) % n
                if not rs and self.sync == "stream":
                    self._wait(self.right_counter, base + (s + 2) * K)
                lo, hi = bounds[c]
                peer = left_src if (rs and s == 0) else left_out
                for k, (a, b) in enumerate(chunk_bounds(hi - lo, K)):
                    a, b = lo + a, lo + b
                    if self.sync == "stream":
                        self._wait(self.left_counter, base + (j - 1) * K + k + 1)
                    if b > a:
                        if rs and op == "avg" and s == n - 2:
                            _kernel(op, last_avg=True)(src[a:b], peer[a:b], src.dtype.type(n), out[a:b])
                        elif rs:
                            _kernel(op)(src[a:b], peer[a:b], out[a:b])
                        else:
                            cupy.cuda.runtime.memcpyAsync(out.data.ptr + a * item, peer.data.ptr + a * item,
                                                          (b - a) * item, 4, self.stream.ptr)
                    if self.sync == "stream":
                        self._write(self.counter, base + j * K + k + 1)
                if self.sync != "stream":
                    self._step_done(None)
            self.progress = base + (2 * n - 1) * K
            if self.sync == "stream":
                # Right reads our src (its step 1) and out (until its last step): the caller may reuse
                # both once we return, so we finish only after right has finished this call.
                self._wait(self.right_counter, self.progress)
        return self._finish(caller)

    def _finish(self, caller):
        """Make the caller's stream wait for us, then wait (bounded) so a dead peer cannot hang us."""
        import cupy
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self.stream)
        caller.wait_event(done)
        if not done.done:
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while not done.done:
                if deadline is not None and time.monotonic() > deadline:
                    raise CollectiveTimeout(f"rank {self.comm.rank}: IPC ring made no progress within "
                                            f"{self.timeout:g} s (neighbours: rank {self.left} and {self.right})")
                os.sched_yield()
        return True

    def close(self):
        """Release peer mappings and our counter (collective: peers must be done with it)."""
        import cupy
        try:
            self.stream.synchronize()
            self.comm.Barrier()
            for ptr in self.opened.values():
                cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            self.opened.clear()
            if self.counter:
                cupy.cuda.runtime.free(self.counter)
                self.counter = 0
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


def get_ipc_ring(comm, slices=1, sync="stream"):
    """The cached IpcRing for (comm, slices, sync); created collectively on first use."""
    key = (comm.py2f(), slices, sync)
    if key not in _rings:
        _rings[key] = IpcRing(comm, slices=slices, sync=sync)
    return _rings[key]


def close_all():
    for ring in list(_rings.values()):
        ring.close()
    _rings.clear()


atexit.register(close_all)
