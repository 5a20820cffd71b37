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
# Ordering is on the GPU (device counters, peer_memory.PeerMemory.counters): step j waits until left's
# counter reaches j (its message j-1 is written). Nobody reads our input or output, only our slots, so
# a call ends with our own last step; the next call first waits until right has finished reading the
# previous call's slots. Cost per rank: 2(N-1) messages of about S/N FP8 codes plus scales pulled from
# the neighbour, one kernel per step. The FP8 format and block size are bound at construction.

import numpy as np

from ringlab.errors import resolve_timeout
from ringlab.gpu.peer_memory import PeerMemory, cached_executor, forget_executor, stream_wait, stream_write, wrap
from ringlab.kernels.formats import check_block, fp8_format
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


class Fp8IpcRing:
    """The FP8 ring over CUDA IPC for one communicator, FP8 format ``fmt`` and ``block`` elements per scale.
    Collective: create and call on all ranks."""

    def __init__(self, comm, fmt="e4m3", block=128, timeout=None):
        import cupy
        from ringlab.kernels.codec import DeviceFp8Codec
        self.codec = DeviceFp8Codec(fmt, block)
        self.comm, self.timeout = comm, resolve_timeout(timeout)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.progress = 0                      # value our counter reaches after all enqueued work
        self.peers = PeerMemory(comm)
        n, r = comm.size, comm.rank
        self.left, self.right = (r - 1) % n, (r + 1) % n
        self.counter, mapped, stream_ops = self.peers.counters(self.stream, {self.left, self.right})
        if not stream_ops:
            raise RuntimeError("the FP8 IPC ring needs CUDA stream memory operations (cuStreamWaitValue32)")
        self.left_counter, self.right_counter = mapped.get(self.left, 0), mapped.get(self.right, 0)
        self.slots = 0                 # device address of our 2N-1 message slots
        self.slot_bytes = 0
        self.left_slots = 0            # our mapping of the left neighbour's slots
        comm.Barrier()

    @property
    def opened(self):
        """Peer mappings held, the left neighbour's slots included (the leak check counts them)."""
        return self.peers.opened

    def _ensure_slots(self, slot_bytes, limit):
        """(Re)allocate the slots when a call needs larger ones; the same decision on every rank
        (same count), collective. The old slots are freed only after right has finished with them.

        The slots are one cudaMalloc of their own (PeerMemory.shared_words), not a CuPy pool block: an IPC handle
        maps the whole allocation, so a pool block at an offset inside a larger one would be read at the wrong place."""
        import cupy
        if self.slots and slot_bytes <= self.slot_bytes:
            return
        n = self.comm.size
        if self.slots:
            stream_wait(self.stream, self.right_counter, self.progress)
            self.peers.finish(self.stream, cupy.cuda.get_current_stream(), limit)
            self.peers.free_words(self.slots, {self.left: self.left_slots})
        self.slot_bytes = slot_bytes                   # a multiple of _ALIGN: whole uint64 words
        self.slots, mapped = self.peers.shared_words((2 * n - 1) * slot_bytes // 8, {self.left})
        self.left_slots = mapped[self.left]

    def allreduce(self, src, out, op="sum", timeout=None):
        """out = FP8 ring all-reduce of every rank's flat ``src`` (``out`` may be ``src``); the host waits at most
        ``timeout`` s (default: the executor's) for completion."""
        import cupy
        caller, limit, done = self.peers.begin(self.stream, src, out, timeout, self.timeout)
        if done:
            return True
        n, r, codec = self.comm.size, self.comm.rank, self.codec
        bounds = chunk_bounds(src.size, n)
        largest = max(hi - lo for lo, hi in bounds)
        self._ensure_slots(-(-codec.nbytes(largest) // _ALIGN) * _ALIGN, limit)
        mine, left, sb = self.slots, self.left_slots, self.slot_bytes

        def message(base, j, count):
            return wrap(base + j * sb, codec.nbytes(count), np.uint8, self)

        base = self.progress
        with self.stream:
            stream_wait(self.stream, self.right_counter, base)            # right has read the last call's slots
            for j, (chunk, kind) in enumerate(fp8_ring_message_plan(r, n)):
                lo, hi = bounds[chunk]
                count = hi - lo
                if j > 0:
                    stream_wait(self.stream, self.left_counter, base + j)  # left's message j-1 is written
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
                stream_write(self.stream, self.counter, base + j + 1)
            self.progress = base + 2 * n - 1
        return self.peers.finish(self.stream, caller, limit)

    def close(self):
        """Release the slots, peer mappings and our counter (no barrier: see IpcRing.close)."""
        try:
            self.stream.synchronize()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass
        self.peers.close()                 # the slots are PeerMemory words: freed and unmapped here
        self.slots = self.left_slots = 0
        forget_executor(self)


def get_fp8_ipc_ring(comm, fmt="e4m3", block=128):
    """The FP8 IPC ring for ``fmt`` and ``block`` cached on ``comm`` (created collectively on first use)."""
    fmt, block = fp8_format(fmt), check_block(block)
    return cached_executor(comm, ("fp8-ring-ipc", fmt.name, block), lambda: Fp8IpcRing(comm, fmt, block))
