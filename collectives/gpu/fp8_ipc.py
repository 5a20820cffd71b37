"""FP8 ring all-reduce over CUDA IPC: every rank pulls its left neighbour's FP8 message from device memory."""
# The ring and the arithmetic are collectives/fp8.py's (same hops, same bytes, bitwise the same result);
# only the wire changes. Each rank keeps 2N-1 message slots in one device buffer that its right
# neighbour has mapped; message j goes to slot j, so no slot is written twice in a call:
#
#       rank r-1                                 rank r
#     slot j-1: [codes | pad | scales]  ---->  step j reads it in place (peer memory),
#                                              writes its own slot j, bumps its counter to j+1
#
#     j = 0         Q(x[c])                         the first chunk r sends (reduce-scatter step 0)
#     j = 1..N-1    hop: Q(x[c] + D(left's j-1))    one fused kernel (dequantize, add, requantize);
#                                                   j = N-1 is r's own chunk: also out[c] = D(Q(sum))
#     j = N..2N-2   copy of left's j-1              all-gather: forwarded unchanged, out[c] = D(message)
#
# Ordering is on the GPU (device counters, as in collectives/gpu/ipc.py): step j waits until left's
# counter reaches j (its message j-1 is written). Nobody reads our input or output, only our slots, so
# a call ends with our own last step; the next call first waits until right has finished reading the
# previous call's slots. Cost per rank: 2(N-1) messages of about S/N FP8 codes plus scales pulled from
# the neighbour, one kernel per step.

import numpy as np

from ringlab.errors import resolve_timeout
from ringlab.gpu.ipc import IpcRing, _wrap, cached_executor
from ringlab.schedule import chunk_bounds, ring_allgather_schedule, ring_reduce_scatter_schedule

__all__ = ["Fp8IpcRing", "get_fp8_ipc_ring", "fp8_ring_message_plan"]

_ALIGN = 256


def fp8_ring_message_plan(rank, nranks):
    """[(chunk, kind)] for messages j = 0..2N-2 of ``rank``: kind is "quantize", "hop", "final" or "forward"."""
    rs = ring_reduce_scatter_schedule(rank, nranks)
    ag = ring_allgather_schedule(rank, nranks)
    plan = [(rs[0].send_chunk, "quantize")]
    plan += [(st.recv_chunk, "final" if st.step == nranks - 2 else "hop") for st in rs]
    plan += [(st.recv_chunk, "forward") for st in ag]
    return plan


class Fp8IpcRing(IpcRing):
    """The FP8 ring over CUDA IPC for one communicator. Collective: create and call on all ranks."""

    def __init__(self, comm, timeout=None):
        super().__init__(comm, slices=1, sync="stream", timeout=timeout)
        if comm.size > 1 and self.sync != "stream":
            raise RuntimeError("the FP8 IPC ring needs CUDA stream memory operations (cuStreamWaitValue32)")
        self.slots = 0                 # device address of our 2N-1 message slots
        self.slot_bytes = 0
        self.left_slots = 0            # our mapping of the left neighbour's slots

    def _ensure_slots(self, slot_bytes):
        """(Re)allocate the slots when a call needs larger ones; the same decision on every rank
        (same count), collective. The old slots are freed only after right has finished with them.

        The slots are one cudaMalloc of their own, not a CuPy pool block: an IPC handle maps the whole
        allocation, so a pool block at an offset inside a larger one would be read at the wrong place."""
        import cupy
        if self.slots and slot_bytes <= self.slot_bytes:
            return
        n = self.comm.size
        if self.slots:
            self._wait(self.right_counter, self.progress)
            self._finish(cupy.cuda.get_current_stream())
            cupy.cuda.runtime.ipcCloseMemHandle(self.left_slots)
            cupy.cuda.runtime.free(self.slots)
        self.slot_bytes = slot_bytes
        self.slots = cupy.cuda.runtime.malloc((2 * n - 1) * slot_bytes)
        cupy.cuda.runtime.memset(self.slots, 0, (2 * n - 1) * slot_bytes)
        cupy.cuda.runtime.deviceSynchronize()
        handles = self.comm.allgather(cupy.cuda.runtime.ipcGetMemHandle(self.slots))
        self.left_slots = cupy.cuda.runtime.ipcOpenMemHandle(handles[self.left])

    def allreduce(self, src, out, codec, op="sum", timeout=None):
        """out = FP8 ring all-reduce of every rank's flat ``src`` (``out`` may be ``src``)."""
        import cupy
        self._call_timeout = self.timeout if timeout is None else resolve_timeout(timeout)
        n, r = self.comm.size, self.comm.rank
        caller = self._after_caller()
        if src.size == 0:
            return out
        if n == 1:
            if out.data.ptr != src.data.ptr:
                cupy.cuda.runtime.memcpyAsync(out.data.ptr, src.data.ptr, src.nbytes, 3, self.stream.ptr)
            self._finish(caller)
            return out
        bounds = chunk_bounds(src.size, n)
        largest = max(hi - lo for lo, hi in bounds)
        self._ensure_slots(-(-codec.nbytes(largest) // _ALIGN) * _ALIGN)
        mine, left, sb = self.slots, self.left_slots, self.slot_bytes

        def message(base, j, count):
            return _wrap(base + j * sb, codec.nbytes(count), np.uint8, self)

        base = self.progress
        with self.stream:
            self._wait(self.right_counter, base)            # right has read the last call's slots
            for j, (chunk, kind) in enumerate(fp8_ring_message_plan(r, n)):
                lo, hi = bounds[chunk]
                count = hi - lo
                if j > 0:
                    self._wait(self.left_counter, base + j)  # left's message j-1 is written
                if count:
                    peer = message(left, j - 1, count) if j > 0 else None
                    if kind == "quantize":
                        codec.quantize(src[lo:hi], message(mine, j, count))
                    elif kind in ("hop", "final"):
                        final = kind == "final"
                        codec.hop(src[lo:hi], peer, message(mine, j, count), out=out[lo:hi] if final else None,
                                  divide_by=n if (final and op == "avg") else 1)
                    else:
                        if j < 2 * n - 2:                    # the last message is read by nobody
                            nb = codec.nbytes(count)
                            cupy.cuda.runtime.memcpyAsync(mine + j * sb, peer.data.ptr, nb, 3, self.stream.ptr)
                            peer = message(mine, j, count)
                        codec.dequantize(peer, out[lo:hi])
                self._write(self.counter, base + j + 1)
            self.progress = base + 2 * n - 1
        self._finish(caller)
        return out

    def close(self):
        import cupy
        try:
            self.stream.synchronize()
            if self.left_slots:
                cupy.cuda.runtime.ipcCloseMemHandle(self.left_slots)
                self.left_slots = 0
            if self.slots:
                cupy.cuda.runtime.free(self.slots)
                self.slots = 0
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass
        super().close()


def get_fp8_ipc_ring(comm):
    """The FP8 IPC ring cached on ``comm`` (created collectively on first use)."""
    return cached_executor(comm, ("fp8-ring-ipc",), lambda: Fp8IpcRing(comm))
