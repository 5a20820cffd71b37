"""CUDA-IPC plumbing every GPU executor is composed from: exported buffers, peer mappings, shared counters,
the call preamble and the bounded host wait; plus the per-communicator executor cache and its leak count.
"""
import atexit
import ctypes
import os
import time
from collections import OrderedDict

import numpy as np
from mpi4py import MPI

from ringlab.commstate import comm_state
from ringlab.errors import CollectiveTimeout, resolve_timeout
from ringlab.faults import handle_timeout

__all__ = ["PeerMemory", "same_gpu_ranks", "wrap", "stream_write", "stream_wait", "cached_executor",
           "forget_executor", "open_ipc_handles", "close_all"]

_MAPPED_PORTABLE = 0x02 | 0x01      # cudaHostAllocMapped | cudaHostAllocPortable
_COUNTER_WORDS = 64                 # 512 bytes of progress counter per executor (32-bit values in word 0)
_live = set()                       # every open executor, for the atexit close and the leak check


def _driver():
    from cuda.bindings import driver
    return driver


def _check(result, what):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: CUresult {int(err)}")
    return result[1:] if isinstance(result, tuple) and len(result) > 1 else None


def wrap(ptr, count, dtype, owner):
    """A CuPy array of ``count`` ``dtype`` at device address ``ptr`` (kept valid by ``owner``)."""
    import cupy
    mem = cupy.cuda.UnownedMemory(int(ptr), max(count * np.dtype(dtype).itemsize, 1), owner,
                                  cupy.cuda.Device().id)
    return cupy.ndarray((count,), dtype, cupy.cuda.MemoryPointer(mem, 0))


def stream_write(stream, addr, value):
    """Enqueue on ``stream``: the 32-bit word at ``addr`` = ``value`` (after the stream's earlier work)."""
    d = _driver()
    _check(d.cuStreamWriteValue32(d.CUstream(stream.ptr), d.CUdeviceptr(addr), value & 0xFFFFFFFF,
                                  d.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT), "cuStreamWriteValue32")


def stream_wait(stream, addr, value):
    """Enqueue on ``stream``: wait until the 32-bit word at ``addr`` is >= ``value``."""
    d = _driver()
    _check(d.cuStreamWaitValue32(d.CUstream(stream.ptr), d.CUdeviceptr(addr), value & 0xFFFFFFFF,
                                 d.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ), "cuStreamWaitValue32")


class PeerMemory:
    """Exports, peer mappings and shared words of one communicator's executor (collective to create)."""

    def __init__(self, comm, max_open=64):
        self.comm, self.max_open = comm, max_open
        self.opened = OrderedDict()      # peer handle bytes -> our mapping of its allocation
        self.pinned = set()
        self._exports = {}               # data pointer -> (buffer id, handle, offset)
        self._device, self._host = [], []

    def export(self, arr):
        """(IPC handle of the allocation holding ``arr``, byte offset of ``arr`` in it). The cache is keyed by
        the pointer and checked against the driver's buffer id, so a freed and re-allocated address is
        never mistaken for the old buffer."""
        import cupy
        d = _driver()
        ptr = arr.data.ptr
        (buffer_id,) = _check(d.cuPointerGetAttribute(d.CUpointer_attribute.CU_POINTER_ATTRIBUTE_BUFFER_ID,
                                                      d.CUdeviceptr(ptr)), "cuPointerGetAttribute")
        hit = self._exports.get(ptr)
        if hit is None or hit[0] != int(buffer_id):
            base, _size = _check(d.cuMemGetAddressRange(d.CUdeviceptr(ptr)), "cuMemGetAddressRange")
            if len(self._exports) > 256:
                self._exports.clear()
            hit = self._exports[ptr] = (int(buffer_id), cupy.cuda.runtime.ipcGetMemHandle(int(base)), ptr - int(base))
        return hit[1], hit[2]

    def open(self, handle, pin=False):
        """Our address of a peer's allocation (mapped once, kept among the ``max_open`` most recent)."""
        import cupy
        if handle not in self.opened:
            self.opened[handle] = cupy.cuda.runtime.ipcOpenMemHandle(handle)
            for old in list(self.opened)[: max(0, len(self.opened) - self.max_open)]:
                if self.opened[old] not in self.pinned:
                    cupy.cuda.runtime.ipcCloseMemHandle(self.opened.pop(old))
        else:
            self.opened.move_to_end(handle)
        if pin:
            self.pinned.add(self.opened[handle])
        return self.opened[handle]

    def shared_words(self, nwords, peers):
        """Zeroed uint64 device words of ours, and our mappings of the same words of each rank in ``peers``.
        Collective. Raises on every rank when any rank cannot map a peer's memory."""
        import cupy
        ptr = cupy.cuda.runtime.malloc(8 * nwords)
        self._device.append(ptr)
        cupy.cuda.runtime.memset(ptr, 0, 8 * nwords)
        cupy.cuda.runtime.deviceSynchronize()
        handles = self.comm.allgather(cupy.cuda.runtime.ipcGetMemHandle(ptr))
        mapped, why = {}, ""
        try:
            for p in peers:
                mapped[p] = ptr if p == self.comm.rank else self.open(handles[p], pin=True)
        except Exception as exc:  # noqa: BLE001 - reported on every rank below
            why = f"rank {self.comm.rank}: {exc}"
        whys = [w for w in self.comm.allgather(why) if w]
        if whys:
            raise RuntimeError("ranks cannot map each other's GPU memory by CUDA IPC (GPUs without peer access?): "
                               + "; ".join(whys))
        return ptr, mapped

    def host_words(self, nwords):
        """(device address, NumPy uint64 view) of zeroed mapped pinned host words."""
        import cupy
        ptr = cupy.cuda.runtime.hostAlloc(8 * nwords, _MAPPED_PORTABLE)
        self._host.append(ptr)
        view = np.ctypeslib.as_array((ctypes.c_uint64 * nwords).from_address(ptr))
        view[:] = 0
        d = _driver()
        (dev,) = _check(d.cuMemHostGetDevicePointer(ptr, 0), "cuMemHostGetDevicePointer")
        return int(dev), view

    # -- what the stream-ordered executors (IpcRing, SharedGpuRing, IpcDirect, Fp8IpcRing) share ------------
    def counters(self, stream, peers, probe=True):
        """(our progress counter, {peer: our mapping of its counter}, stream_ops): zeroed device counters, none
        with one rank. ``stream_ops``: the agreed answer whether every rank's driver takes stream memory operations
        on ``stream`` (checked when ``probe``). Collective."""
        if self.comm.size == 1:
            return 0, {}, True
        mine, mapped = self.shared_words(_COUNTER_WORDS, peers)
        ok = 1
        if probe:
            try:
                stream_write(stream, mine, 0)
                stream_wait(stream, mine, 0)
                stream.synchronize()
            except Exception:  # noqa: BLE001 - agreed below: every rank falls back together
                ok = 0
            ok = self.comm.allreduce(ok, op=MPI.MIN)
        return mine, mapped, bool(ok)

    def exchange(self, *arrays):
        """Every rank's exports of its ``arrays``, indexed by rank: ``[rank][i] = (handle, offset)``. Collective."""
        return self.comm.allgather(tuple(self.export(a) for a in arrays))

    def view(self, exported, like):
        """Our CuPy view of a peer's exported buffer shaped as ``like`` (flat: size and dtype)."""
        handle, offset = exported
        return wrap(self.open(handle) + offset, like.size, like.dtype, self)

    def free_words(self, ptr, mapped):
        """Free our words ``ptr`` and unmap our mappings ``mapped`` of the peers' (from ``shared_words``)."""
        import cupy
        for addr in set(mapped.values()) - {ptr}:
            for handle in [h for h, a in self.opened.items() if a == addr]:
                cupy.cuda.runtime.ipcCloseMemHandle(self.opened.pop(handle))
            self.pinned.discard(addr)
        self._device.remove(ptr)
        cupy.cuda.runtime.free(ptr)

    def begin(self, stream, src, out, timeout, default):
        """The call preamble: (caller's stream, the call's time limit, done). ``stream`` is ordered after the
        caller's current stream (where ``src`` is final); ``done`` when nothing moves between ranks (an empty
        buffer, or one rank: ``src`` copied to ``out`` and waited for)."""
        import cupy
        limit = default if timeout is None else resolve_timeout(timeout)
        caller = cupy.cuda.get_current_stream()
        if caller.is_capturing():      # its host waits would never see a captured event complete: a hang
            raise RuntimeError("a host-driven CUDA IPC collective waits on the host every call and cannot be captured "
                               "in a CUDA graph: use transport='device' or algo 'oneshot' / 'twoshot' (with MPS "
                               "running when ranks share a GPU)")
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(caller)
        stream.wait_event(ready)
        if src.size == 0:
            return caller, limit, True
        if self.comm.size == 1:
            if out.data.ptr != src.data.ptr:
                cupy.cuda.runtime.memcpyAsync(out.data.ptr, src.data.ptr, src.nbytes, 3, stream.ptr)
            self.finish(stream, caller, limit)
            return caller, limit, True
        return caller, limit, False

    def finish(self, stream, caller, limit):
        """Make ``caller`` wait for ``stream``, then wait on the host at most ``limit`` s for it (None: no bound),
        so a dead peer cannot hang us. Returns True."""
        import cupy
        done = cupy.cuda.Event(disable_timing=True)
        done.record(stream)
        caller.wait_event(done)
        n, r = self.comm.size, self.comm.rank
        self.bounded_wait(lambda: done.done, limit, lambda: f"rank {r}: IPC collective made no progress within "
                          f"{limit:g} s (neighbours: rank {(r - 1) % n} and {(r + 1) % n})")
        return True

    def bounded_wait(self, ready, limit, message, peer=None):
        """Poll ``ready()`` until true; after ``limit`` s (None: never) raise CollectiveTimeout(``message()``),
        first handed to faults.handle_timeout (which aborts the job by default)."""
        if ready():
            return
        deadline = None if limit is None else time.monotonic() + limit
        while not ready():
            if deadline is not None and time.monotonic() > deadline:
                exc = CollectiveTimeout(message(), peer=peer, rank=self.comm.rank)
                handle_timeout(exc)
                raise exc
            os.sched_yield()

    def close(self):
        """Unmap peers and free our words (no barrier: see IpcRing.close)."""
        import cupy
        try:
            for ptr in self.opened.values():
                cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            self.opened.clear()
            for ptr in self._device:
                cupy.cuda.runtime.free(ptr)
            for ptr in self._host:
                cupy.cuda.runtime.freeHost(ptr)
            self._device, self._host = [], []
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass


def same_gpu_ranks(comm):
    """Ranks of ``comm`` that use the same physical GPU as this rank (this rank included)."""
    import cupy
    mine = (MPI.Get_processor_name(), cupy.cuda.Device().pci_bus_id)
    return [k for k, other in enumerate(comm.allgather(mine)) if other == mine]


def cached_executor(comm, key, make):
    """The executor cached on ``comm`` under ``key``: ``make()`` on first use (collectively), closed with ``comm``."""
    state = comm_state(comm)
    if key not in state:
        state[key] = make()
        _live.add(state[key])
    return state[key]


def forget_executor(executor):
    """Drop a closed executor from the live set (the atexit close and the leak count)."""
    _live.discard(executor)


def open_ipc_handles():
    """How many peer memory mappings this process's executors hold open (the leak check watches it)."""
    return sum(len(executor.opened) for executor in _live)


def close_all():
    for executor in list(_live):
        executor.close()


atexit.register(close_all)
