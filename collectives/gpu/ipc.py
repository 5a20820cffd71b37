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

import atexit
import os
import time
from collections import OrderedDict
from functools import lru_cache

import numpy as np
from mpi4py import MPI

from ringlab.errors import CollectiveTimeout, resolve_timeout
from ringlab.faults import abort_job, handle_timeout
from ringlab.gpu.peer_memory import _check, _driver   # the CUDA driver calls, checked
from ringlab.kernels.optable import OP_TABLE
from ringlab.kernels.cuda_reduce import TASK_DTYPE, reduce_kernel_vec, step_kernel
from ringlab import settings
from ringlab.commstate import comm_state
from ringlab.schedule import chunk_bounds, ring_allgather_schedule, ring_reduce_scatter_schedule

__all__ = ["IpcRing", "SharedGpuRing", "ring_pull_plan", "ipc_usable", "get_ipc_ring", "all_ranks_share_one_gpu", "cached_executor", "open_ipc_handles", "close_all"]

_EXPR = {name: op.c_expr for name, op in OP_TABLE.items()}    # kernels/optable.py (NaN as numpy.maximum)
_kernels = {}
_live = set()      # every open executor, for the atexit close and the leak check
_TRACE = settings.get("RINGLAB_IPC_TRACE")   # leader prints its wait/ops split per call
_VECTOR = settings.get("RINGLAB_IPC_VECTOR")   # 16-byte kernel (0: CuPy elementwise)
_STEP_TYPES = ("float16", "float32", "float64", "int32", "int64") if _VECTOR else ()


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


def _wrap(ptr, count, dtype, owner):
    import cupy
    mem = cupy.cuda.UnownedMemory(int(ptr), max(count * np.dtype(dtype).itemsize, 1), owner,
                                  cupy.cuda.Device().id)
    return cupy.ndarray((count,), dtype, cupy.cuda.MemoryPointer(mem, 0))


@lru_cache(maxsize=64)
def ring_pull_plan(nranks, count):
    """The ring of schedule.py as pulls: ``plan[step][rank] = (lo, hi, reduce, from_input)``.

    At each step a rank receives the schedule's ``recv_chunk`` from its left neighbour; pulling it,
    the rank reads the neighbour's *input* at the first reduce-scatter step (nothing is reduced
    yet) and its *output* afterwards, and reduces (reduce-scatter) or copies (all-gather).
    """
    bounds = chunk_bounds(count, nranks)
    rs = [ring_reduce_scatter_schedule(k, nranks) for k in range(nranks)]
    ag = [ring_allgather_schedule(k, nranks) for k in range(nranks)]
    plan = [tuple((*bounds[rs[k][s].recv_chunk], True, s == 0) for k in range(nranks)) for s in range(nranks - 1)]
    plan += [tuple((*bounds[ag[k][s].recv_chunk], False, False) for k in range(nranks)) for s in range(nranks - 1)]
    return tuple(plan)


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
        self._call_timeout = self.timeout
        if self.slices < 1:
            raise ValueError(f"slices must be >= 1, got {slices}")
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.progress = 0                      # value our counter reaches after all enqueued work
        self.opened = OrderedDict()            # peer handle bytes -> our mapping of its base
        self.exported = {}                     # (base, driver buffer id) -> our IPC handle
        n, r = comm.size, comm.rank
        self.counter = cupy.cuda.runtime.malloc(512) if n > 1 else 0
        if n > 1:
            cupy.cuda.runtime.memset(self.counter, 0, 512)
            cupy.cuda.runtime.deviceSynchronize()
        handles = comm.allgather(cupy.cuda.runtime.ipcGetMemHandle(self.counter) if n > 1 else None)
        self.counter_handles = handles
        self.pinned = set()                    # mappings the bounded cache must never close
        self.left, self.right = (r - 1) % n, (r + 1) % n
        self.left_counter = self._open(handles[self.left], pin=True) if n > 1 else 0
        self.right_counter = self._open(handles[self.right], pin=True) if n > 1 else 0
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
    def _open(self, handle, pin=False):
        import cupy
        if handle not in self.opened:
            self.opened[handle] = cupy.cuda.runtime.ipcOpenMemHandle(handle)
            for old in list(self.opened)[: max(0, len(self.opened) - 64)]:   # bounded cache
                if self.opened[old] not in self.pinned:
                    cupy.cuda.runtime.ipcCloseMemHandle(self.opened.pop(old))
        else:
            self.opened.move_to_end(handle)
        if pin:
            self.pinned.add(self.opened[handle])
        return self.opened[handle]

    def _peer_view(self, exported, like):
        handle, offset = exported
        return _wrap(self._open(handle) + offset, like.size, like.dtype, self)

    def _reduce_step(self, op, src, peer, out, n, last):
        """out = src (op) peer on the current stream; avg divides at the last reduce-scatter step."""
        if _VECTOR and reduce_kernel_vec(src, peer, out, "avg_last" if last and op == "avg" else op, n):
            return
        if last and op == "avg":
            _kernel(op, last_avg=True)(src, peer, src.dtype.type(n), out)
        else:
            _kernel(op)(src, peer, out)

    def _export(self, arr):
        """(handle of the allocation holding ``arr``, byte offset of ``arr`` in it).

        Handles are cached per allocation, keyed by the driver's unique buffer id, so a buffer
        freed and re-allocated at the same address is never confused with the old one."""
        import cupy
        d = _driver()
        ptr = d.CUdeviceptr(arr.data.ptr)
        base, _size = _check(d.cuMemGetAddressRange(ptr), "cuMemGetAddressRange")
        (buffer_id,) = _check(d.cuPointerGetAttribute(d.CUpointer_attribute.CU_POINTER_ATTRIBUTE_BUFFER_ID, ptr),
                              "cuPointerGetAttribute")
        key = (int(base), int(buffer_id))
        if key not in self.exported:
            if len(self.exported) > 256:
                self.exported.clear()
            self.exported[key] = cupy.cuda.runtime.ipcGetMemHandle(int(base))
        return self.exported[key], arr.data.ptr - int(base)

    def _write(self, addr, value):
        d = _driver()
        _check(d.cuStreamWriteValue32(d.CUstream(self.stream.ptr), d.CUdeviceptr(addr), value & 0xFFFFFFFF,
                                      d.CUstreamWriteValue_flags.CU_STREAM_WRITE_VALUE_DEFAULT), "cuStreamWriteValue32")

    def _wait(self, addr, value):
        d = _driver()
        _check(d.cuStreamWaitValue32(d.CUstream(self.stream.ptr), d.CUdeviceptr(addr), value & 0xFFFFFFFF,
                                     d.CUstreamWaitValue_flags.CU_STREAM_WAIT_VALUE_GEQ), "cuStreamWaitValue32")

    def _after_caller(self):
        """Order our stream after the caller's current stream (its input is final there); return it."""
        import cupy
        caller = cupy.cuda.get_current_stream()
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(caller)
        self.stream.wait_event(ready)
        return caller

    def _step_done(self, value):
        if self.sync == "stream":
            self._write(self.counter, value)
        else:
            self.stream.synchronize()
            self.comm.Barrier()

    # -- the collective ---------------------------------------------------------------------------
    def allreduce(self, src, out, op="sum", timeout=None):
        """out = reduction of every rank's ``src`` (flat, contiguous, same size and dtype everywhere);
        the host waits at most ``timeout`` s (default: the executor's) for completion."""
        import cupy
        self._call_timeout = self.timeout if timeout is None else resolve_timeout(timeout)
        comm, n, r, K = self.comm, self.comm.size, self.comm.rank, self.slices
        caller = self._after_caller()
        if src.size == 0:
            return True
        if n == 1:
            if out.data.ptr != src.data.ptr:
                cupy.cuda.runtime.memcpyAsync(out.data.ptr, src.data.ptr, src.nbytes, 3, self.stream.ptr)
            return self._finish(caller)
        # Control plane: one allgather of (src, out) handles; mappings are cached across calls.
        theirs = comm.allgather((self._export(src), self._export(out)))[self.left]
        left_src, left_out = self._peer_view(theirs[0], src), self._peer_view(theirs[1], src)
        plan = ring_pull_plan(n, src.size)
        base = self.progress
        item = src.dtype.itemsize
        with self.stream:
            if self.sync == "stream":
                self._wait(self.right_counter, base)      # right finished reading our buffers last call
            self._step_done(base + K)                      # step 0: "my input is ready"
            for j in range(1, 2 * n - 1):
                lo, hi, rs, from_input = plan[j - 1][r]
                s = j - 1 if rs else j - n
                if not rs and self.sync == "stream":
                    self._wait(self.right_counter, base + (s + 2) * K)
                peer = left_src if from_input else left_out
                for k, (a, b) in enumerate(chunk_bounds(hi - lo, K)):
                    a, b = lo + a, lo + b
                    if self.sync == "stream":
                        self._wait(self.left_counter, base + (j - 1) * K + k + 1)
                    if b > a:
                        if rs:
                            self._reduce_step(op, src[a:b], peer[a:b], out[a:b], n, last=s == n - 2)
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
            limit = self._call_timeout
            deadline = None if limit is None else time.monotonic() + limit
            while not done.done:
                if deadline is not None and time.monotonic() > deadline:
                    exc = CollectiveTimeout(f"rank {self.comm.rank}: IPC collective made no progress within "
                                            f"{limit:g} s (neighbours: rank {self.left} and {self.right})",
                                            rank=self.comm.rank)
                    handle_timeout(exc)     # abort the job by default (collectives/faults.py)
                    raise exc
                os.sched_yield()
        return True

    def close(self):
        """Release peer mappings and our counter. No barrier: at exit after an error on some rank,
        waiting for peers here would hang; every completed call already waited for its readers."""
        import cupy
        try:
            self.stream.synchronize()
            for ptr in self.opened.values():
                cupy.cuda.runtime.ipcCloseMemHandle(ptr)
            self.opened.clear()
            if self.counter:
                cupy.cuda.runtime.free(self.counter)
                self.counter = 0
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass
        _live.discard(self)


class SharedGpuRing(IpcRing):
    """The same ring schedule for ranks that all share ONE GPU, driven from one CUDA context.

    Processes on one GPU time-slice: each of the 2(N-1) steps of the per-rank ring needs all N
    contexts scheduled in turn, and the context switches, not the bytes, set the time
    (docs/gpu_datapath.md has the measurement). Here rank 0 maps every rank's buffers and issues every
    rank's steps, in ring order, on its own stream: identical data movement and results, no
    switches. Ranks signal "input ready" and wait for "done" on device counters, as above.
    """

    def __init__(self, comm, timeout=None):
        super().__init__(comm, slices=1, sync="stream", timeout=timeout)
        if self.sync != "stream":
            raise RuntimeError("the shared-GPU ring needs CUDA stream memory operations")
        self.calls = 0
        n = comm.size
        if comm.rank == 0:
            self.counters = [self.counter] + [self._open(h, pin=True) for h in self.counter_handles[1:n]]
        else:
            self.leader_counter = self._open(self.counter_handles[0], pin=True)  # cached if a neighbour

    def allreduce(self, src, out, op="sum", timeout=None):
        import cupy
        comm, n, r = self.comm, self.comm.size, self.comm.rank
        if n == 1:
            return IpcRing.allreduce(self, src, out, op, timeout)
        self._call_timeout = self.timeout if timeout is None else resolve_timeout(timeout)
        caller = self._after_caller()
        if src.size == 0:
            return True
        t_host = time.perf_counter()
        everyone = comm.allgather((self._export(src), self._export(out)))
        self.calls += 1
        call = self.calls
        with self.stream:
            if r != 0:
                self._write(self.counter, call)           # my input is ready (after the caller's work)
                self._wait(self.leader_counter, call)     # rank 0 finished every step of this call
                return self._finish(caller)
            srcs = [src] + [self._peer_view(everyone[k][0], src) for k in range(1, n)]
            outs = [out] + [self._peer_view(everyone[k][1], src) for k in range(1, n)]
            trace = [cupy.cuda.Event() for _ in range(3)] if _TRACE else None
            if trace:
                trace[0].record(self.stream)
            for k in range(1, n):
                self._wait(self.counters[k], call)
            if trace:
                trace[1].record(self.stream)
            try:
                if src.dtype.name in _STEP_TYPES:
                    self._batched_steps(srcs, outs, op, n)
                else:
                    self._steps_one_by_one(srcs, outs, op, n)
            except Exception as exc:  # the others wait on our counter: never leave them hanging
                abort_job(exc, code=1)
            self._write(self.counter, call)
            if trace:
                trace[2].record(self.stream)
                t_host = time.perf_counter() - t_host
        self._finish(caller)
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
                    self._reduce_step(op, srcs[k][lo:hi], peer[lo:hi], outs[k][lo:hi], n, last=j == n - 2)
                else:
                    cupy.cuda.runtime.memcpyAsync(outs[k].data.ptr + lo * item, peer.data.ptr + lo * item,
                                                  (hi - lo) * item, 4, self.stream.ptr)


def get_ipc_ring(comm, slices=1, sync="stream"):
    """The ring executor cached on ``comm`` for (slices, sync); created collectively on first use,
    closed when the communicator is freed. ``sync="shared"`` gives the SharedGpuRing."""
    return cached_executor(comm, ("ring", slices, sync),
                           lambda: SharedGpuRing(comm) if sync == "shared" else IpcRing(comm, slices=slices, sync=sync))


def cached_executor(comm, key, make):
    state = comm_state(comm)
    if key not in state:
        state[key] = make()
        _live.add(state[key])
    return state[key]


def all_ranks_share_one_gpu(comm):
    """True when every rank of ``comm`` uses the same physical GPU (same answer on every rank)."""
    import cupy
    ids = comm.allgather((MPI.Get_processor_name(), cupy.cuda.Device().pci_bus_id))
    return len(set(ids)) == 1


def open_ipc_handles():
    """How many peer memory mappings this process holds open (the leak check watches it)."""
    return sum(len(ring.opened) + (1 if getattr(ring, "left_slots", 0) else 0) for ring in _live)


def close_all():
    for ring in list(_live):
        ring.close()


atexit.register(close_all)
