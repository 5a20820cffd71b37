"""CUDA-IPC plumbing a GPU executor is composed from: exported buffers, opened peer mappings, shared words.

``export`` (cached per allocation, checked by buffer id), ``open`` (bounded cache), ``shared_words`` (device
counters every rank maps), ``host_words`` (mapped pinned words the host reads without a sync).
"""
import ctypes
from collections import OrderedDict

import numpy as np
from mpi4py import MPI

__all__ = ["PeerMemory"]

_MAPPED_PORTABLE = 0x02 | 0x01      # cudaHostAllocMapped | cudaHostAllocPortable


def _driver():
    from cuda.bindings import driver
    return driver


def _check(result, what):
    err = result[0] if isinstance(result, tuple) else result
    if int(err) != 0:
        raise RuntimeError(f"{what} failed: CUresult {int(err)}")
    return result[1:] if isinstance(result, tuple) and len(result) > 1 else None


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
