"""The IPC ring for ranks that all share ONE GPU, driven from one CUDA context: rank 0 issues every rank's steps."""
# Processes on one GPU time-slice: each of the 2(N-1) steps of the per-rank ring needs all N
# contexts scheduled in turn, and the context switches, not the bytes, set the time
# (docs/gpu_datapath.md has the measurement). Here rank 0 maps every rank's buffers and issues every
# rank's steps, in ring order (ring_steps.ring_pull_plan, as IpcRing), on its own stream: identical
# data movement and results, no switches. Ranks signal "input ready" and wait for "done" on device counters.

import time

import numpy as np

from ringlab import settings
from ringlab.errors import resolve_timeout
from ringlab.faults import abort_job
from ringlab.gpu.peer_memory import PeerMemory, forget_executor, stream_wait, stream_write
from ringlab.gpu.ring_steps import STEP_TYPES, reduce_step, ring_pull_plan
from ringlab.kernels.cuda_reduce import TASK_DTYPE, step_kernel

__all__ = ["SharedGpuRing"]

_TRACE = settings.get("RINGLAB_IPC_TRACE")   # leader prints its wait/ops split per call


class SharedGpuRing:
    """The ring schedule of IpcRing for ranks that all share one GPU, run by rank 0. Collective: create and use
    on all ranks."""

    def __init__(self, comm, timeout=None):
        import cupy
        self.comm, self.timeout = comm, resolve_timeout(timeout)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.peers = PeerMemory(comm)
        self.calls = 0
        n, r = comm.size, comm.rank
        # rank 0 waits on every rank's counter; every other rank waits on rank 0's
        self.counter, mapped, stream_ops = self.peers.counters(self.stream, set(range(n)) if r == 0 else {0})
        if not stream_ops:
            raise RuntimeError("the shared-GPU ring needs CUDA stream memory operations")
        if r == 0:
            self.counters = [self.counter] + [mapped[k] for k in range(1, n)]
        else:
            self.leader_counter = mapped[0]
        comm.Barrier()

    @property
    def opened(self):
        """Peer mappings held (the leak check counts them)."""
        return self.peers.opened

    def allreduce(self, src, out, op="sum", timeout=None):
        """out = reduction of every rank's flat ``src``; the host waits at most ``timeout`` s (default: the
        executor's) for completion."""
        import cupy
        caller, limit, done = self.peers.begin(self.stream, src, out, timeout, self.timeout)
        if done:
            return True
        n, r = self.comm.size, self.comm.rank
        t_host = time.perf_counter()
        everyone = self.peers.exchange(src, out)
        self.calls += 1
        call = self.calls
        with self.stream:
            if r != 0:
                stream_write(self.stream, self.counter, call)           # my input is ready (after the caller's work)
                stream_wait(self.stream, self.leader_counter, call)     # rank 0 finished every step of this call
                return self.peers.finish(self.stream, caller, limit)
            srcs = [src] + [self.peers.view(everyone[k][0], src) for k in range(1, n)]
            outs = [out] + [self.peers.view(everyone[k][1], src) for k in range(1, n)]
            trace = [cupy.cuda.Event() for _ in range(3)] if _TRACE else None
            if trace:
                trace[0].record(self.stream)
            for k in range(1, n):
                stream_wait(self.stream, self.counters[k], call)
            if trace:
                trace[1].record(self.stream)
            try:
                if src.dtype.name in STEP_TYPES:
                    self._batched_steps(srcs, outs, op, n)
                else:
                    self._steps_one_by_one(srcs, outs, op, n)
            except Exception as exc:  # the others wait on our counter: never leave them hanging
                abort_job(exc, code=1)
            stream_write(self.stream, self.counter, call)
            if trace:
                trace[2].record(self.stream)
                t_host = time.perf_counter() - t_host
        self.peers.finish(self.stream, caller, limit)
        if trace:
            print(f"[ipc-shared trace] wait for peers {cupy.cuda.get_elapsed_time(trace[0], trace[1]) * 1e3:8.1f} us, "
                  f"ring ops {cupy.cuda.get_elapsed_time(trace[1], trace[2]) * 1e3:8.1f} us, host enqueue {t_host * 1e6:8.1f} us",
                  flush=True)
        return True

    def _batched_steps(self, srcs, outs, op, n):
        """Every rank's part of a ring step in one launch: 2(N-1) launches instead of 2N(N-1)."""
        import cupy
        plan = ring_pull_plan(n, srcs[0].size)
        table = np.zeros((len(plan), n), dtype=TASK_DTYPE)
        for j, step in enumerate(plan):
            for k, (lo, hi, reduce, from_input) in enumerate(step):
                peer = srcs[k - 1] if from_input else outs[k - 1]
                table[j, k] = (srcs[k].data.ptr if reduce else 0, peer.data.ptr, outs[k].data.ptr, lo, hi)
        self._table = cupy.asarray(table)                              # alive until the next call
        longest = max((hi - lo for lo, hi, *_ in plan[0]), default=0)
        for j, step in enumerate(plan):
            reduce = step[0][2]
            step_op = "avg_last" if (reduce and op == "avg" and j == n - 2) else op
            step_kernel(self._table.data.ptr + j * n * TASK_DTYPE.itemsize, n, srcs[0].dtype, step_op, n,
                        copy=0 if reduce else 1, longest=longest)

    def _steps_one_by_one(self, srcs, outs, op, n):
        import cupy
        item = srcs[0].dtype.itemsize
        for j, step in enumerate(ring_pull_plan(n, srcs[0].size)):
            for k, (lo, hi, reduce, from_input) in enumerate(step):
                peer = srcs[k - 1] if from_input else outs[k - 1]
                if hi <= lo:
                    continue
                if reduce:
                    reduce_step(op, srcs[k][lo:hi], peer[lo:hi], outs[k][lo:hi], n, last=j == n - 2)
                else:
                    cupy.cuda.runtime.memcpyAsync(outs[k].data.ptr + lo * item, peer.data.ptr + lo * item,
                                                  (hi - lo) * item, 4, self.stream.ptr)

    def close(self):
        """Release peer mappings and our counter (no barrier: see IpcRing.close)."""
        try:
            self.stream.synchronize()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass
        self.peers.close()
        forget_executor(self)
