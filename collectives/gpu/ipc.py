"""CUDA IPC ring: GPU ranks of one node read their left neighbour's device memory directly."""
# MPI is only the control plane (handles, small metadata). Each ring step is one fused kernel that
# reads the peer's chunk and the local input and writes the local output once (reduce-scatter), or a
# device copy (all-gather). Cross-process ordering is done on the GPU: every rank owns a progress
# counter in device memory; after each slice it bumps the counter with cuStreamWriteValue32, and
# before a slice it waits on its neighbours' counters with cuStreamWaitValue32, so no host round trip
# sits between steps. ``sync="host"`` replaces that with a stream sync + barrier per step (slow,
# obviously correct, and the fallback where stream memory operations are missing).
#
#     reduce-scatter step s (rank r pulls from r-1):  out[c] = src[c] (op) left[c],  c = (r-s-1) mod N
#         left = left's src at s = 0 (nothing reduced yet), left's out afterwards
#     all-gather step s:                               out[c] = left.out[c],          c = (r-s) mod N
#
# Ordering rules, in slices of the counter (K slices per step, the first "step" is the call's start):
#     read-after-write : slice k of step j waits until left finished slice k of step j-1
#     write-after-read : all-gather step s waits until right finished reduce-scatter step s (it read
#                        the chunk that step overwrites), and a call completes only when right has
#                        finished it too (right reads our src and out, which the caller may reuse)

from mpi4py import MPI

from ringlab.commstate import comm_state
from ringlab.errors import resolve_timeout
from ringlab.gpu.peer_memory import (PeerMemory, _driver, cached_executor, forget_executor, stream_wait,
                                     stream_write)
from ringlab.gpu.ring_steps import reduce_step, ring_pull_plan
from ringlab.gpu.shared_ring import SharedGpuRing
from ringlab.schedule import chunk_bounds

# ring_pull_plan, SharedGpuRing and cached_executor are re-exported: callers import them from here.
__all__ = ["IpcRing", "SharedGpuRing", "ring_pull_plan", "ipc_usable", "get_ipc_ring", "all_ranks_share_one_gpu",
           "cached_executor"]


def ipc_usable(comm):
    """(True, why) when every rank has a GPU and all ranks share one node; same answer everywhere.

    Collective on the first call for ``comm``; the answer is cached on the communicator, so the
    one-shot/two-shot hot path pays no Split_type and no allreduce per call."""
    state = comm_state(comm)
    if "ipc-usable" not in state:
        state["ipc-usable"] = _ipc_usable(comm)
    return state["ipc-usable"]


def _ipc_usable(comm):
    from ringlab.arrays import cupy_or_none
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
        self.comm, self.slices = comm, int(slices)
        self.timeout = resolve_timeout(timeout)     # per call: allreduce(..., timeout=) overrides it
        if self.slices < 1:
            raise ValueError(f"slices must be >= 1, got {slices}")
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.progress = 0                      # value our counter reaches after all enqueued work
        self.peers = PeerMemory(comm)
        n, r = comm.size, comm.rank
        self.left, self.right = (r - 1) % n, (r + 1) % n
        # sync="stream" needs the driver to accept stream memory operations on every rank, else "host"
        self.counter, mapped, stream_ops = self.peers.counters(self.stream, {self.left, self.right},
                                                               probe=sync == "stream")
        self.left_counter, self.right_counter = mapped.get(self.left, 0), mapped.get(self.right, 0)
        self.sync = sync if stream_ops else "host"
        comm.Barrier()

    @property
    def opened(self):
        """Peer mappings held (the leak check counts them)."""
        return self.peers.opened

    def _step_done(self, value):
        if self.sync == "stream":
            stream_write(self.stream, self.counter, value)
        else:
            self.stream.synchronize()
            self.comm.Barrier()

    # -- the collective ---------------------------------------------------------------------------
    def allreduce(self, src, out, op="sum", timeout=None):
        """out = reduction of every rank's ``src`` (flat, contiguous, same size and dtype everywhere);
        the host waits at most ``timeout`` s (default: the executor's) for completion."""
        import cupy
        caller, limit, done = self.peers.begin(self.stream, src, out, timeout, self.timeout)
        if done:
            return True
        n, r, K = self.comm.size, self.comm.rank, self.slices
        stream, streamed = self.stream, self.sync == "stream"
        # Control plane: one allgather of (src, out) handles; mappings are cached across calls.
        theirs = self.peers.exchange(src, out)[self.left]
        left_src, left_out = self.peers.view(theirs[0], src), self.peers.view(theirs[1], src)
        plan = ring_pull_plan(n, src.size)
        base = self.progress
        item = src.dtype.itemsize
        with stream:
            if streamed:
                stream_wait(stream, self.right_counter, base)      # right finished reading our buffers last call
            self._step_done(base + K)                              # step 0: "my input is ready"
            for j in range(1, 2 * n - 1):
                lo, hi, rs, from_input = plan[j - 1][r]
                s = j - 1 if rs else j - n
                if not rs and streamed:
                    stream_wait(stream, self.right_counter, base + (s + 2) * K)
                peer = left_src if from_input else left_out
                for k, (a, b) in enumerate(chunk_bounds(hi - lo, K)):
                    a, b = lo + a, lo + b
                    if streamed:
                        stream_wait(stream, self.left_counter, base + (j - 1) * K + k + 1)
                    if b > a:
                        if rs:
                            reduce_step(op, src[a:b], peer[a:b], out[a:b], n, last=s == n - 2)
                        else:
                            cupy.cuda.runtime.memcpyAsync(out.data.ptr + a * item, peer.data.ptr + a * item,
                                                          (b - a) * item, 4, stream.ptr)
                    if streamed:
                        stream_write(stream, self.counter, base + j * K + k + 1)
                if not streamed:
                    self._step_done(None)
            self.progress = base + (2 * n - 1) * K
            if streamed:
                # Right reads our src (its step 1) and out (until its last step): the caller may reuse
                # both once we return, so we finish only after right has finished this call.
                stream_wait(stream, self.right_counter, self.progress)
        return self.peers.finish(stream, caller, limit)

    def close(self):
        """Release peer mappings and our counter. No barrier: at exit after an error on some rank,
        waiting for peers here would hang; every completed call already waited for its readers."""
        try:
            self.stream.synchronize()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass
        self.peers.close()
        forget_executor(self)


def get_ipc_ring(comm, slices=1, sync="stream"):
    """The ring executor cached on ``comm`` for (slices, sync); created collectively on first use,
    closed when the communicator is freed. ``sync="shared"`` gives the SharedGpuRing."""
    return cached_executor(comm, ("ring", slices, sync),
                           lambda: SharedGpuRing(comm) if sync == "shared" else IpcRing(comm, slices=slices, sync=sync))


def all_ranks_share_one_gpu(comm):
    """True when every rank of ``comm`` uses the same physical GPU (same answer on every rank)."""
    import cupy
    ids = comm.allgather((MPI.Get_processor_name(), cupy.cuda.Device().pci_bus_id))
    return len(set(ids)) == 1
