"""Device-driven ring all-reduce: each call is ONE launch of the persistent ring kernel per rank.

Under MPS (or one rank per GPU) the per-rank kernels co-run; ``mode="auto"`` probes that once and otherwise
hands calls to the single-context SharedGpuRing. Messages up to ``stage_bytes`` run in a staging buffer mapped once,
so a call needs no host message. Stream-ordered, graph-capturable (docs/device_ring.md).
"""
import os
import time

import numpy as np
from mpi4py import MPI

from ringlab.errors import CollectiveTimeout, resolve_timeout
from ringlab.faults import handle_timeout
from ringlab.gpu.device_plan import (address_row, check_max_parts, check_max_slices, first_chunk, launch_shape,
                                     parts_for, program_table)
from ringlab.gpu.peer_memory import PeerMemory, same_gpu_ranks
from ringlab.gpu.persistent import PROBE_LIMIT_NS, THREADS, DriverLaunch, cached, check, mps_visible, probe, synchronize
from ringlab.kernels.ring_kernel import KERNEL_DTYPES, KERNEL_OPS, MAX_PARTS, MAX_SLICES, STATUS_OK, check_group
from ringlab.kernels.ring_layout import check_int

__all__ = ["DeviceRing", "get_device_ring", "mps_visible", "THREADS", "MAX_REGISTERS", "PROBE_LIMIT_NS", "STAGE_BYTES",
           "DriverLaunch"]       # mps_visible, THREADS, PROBE_LIMIT_NS, DriverLaunch: from persistent.py

# THREADS = 768 per block, with registers capped at MAX_REGISTERS: one block per SM fits
MAX_REGISTERS = 80               # (the uncapped kernel needs 96: 512 threads; docs/device_ring.md has both)
SLICE_BYTES = 4 << 20            # per block per slice, at least: fewer drains beat finer pipelining here
STAGE_BYTES = 1 << 20            # per rank: calls up to this size copy in and out of a buffer peers mapped once
_HANDLE = 64                     # bytes of a CUDA IPC handle


class DeviceRing:
    """Ring all-reduce by one persistent kernel per rank. Collective: create and use on all ranks.

    ``mode``: "auto" (probe), "per-rank" (trust that kernels co-run) or "single-context" (SharedGpuRing).
    ``threads`` per block and ``blocks_per_sm`` size the launch (every block of every rank must be resident);
    ``stage_bytes``: calls up to this size go through the staging buffer (0: never). ``scope`` of the flags:
    None picks "gpu" when every rank runs on this GPU, else "sys"; ``max_registers`` caps the kernel's;
    ``slice_bytes``: the least bytes a block moves between two flag updates (pipelining vs drains).
    ``group`` (slices per group, 0: all; kernels/ring_kernel.py's check_group) and ``max_slices`` (<= 64): the
    walk's order and how finely a chunk is sliced (both change no bits);
    ``stage_split``: separate staging halves for src and out (the ring out of place) instead of one in place;
    ``max_in_flight``: when > 0, the host waits for the call that many calls back before launching (queue depth).
    """
    STATUS_OK, _label, _table_label = STATUS_OK, "device ring", "device ring"    # for persistent.py's methods
    check, synchronize, _cached = check, synchronize, cached

    def __init__(self, comm, timeout=None, mode="auto", trace=False, max_parts=None, threads=THREADS,
                 blocks_per_sm=1, stage_bytes=STAGE_BYTES, scope=None, max_registers=MAX_REGISTERS,
                 slice_bytes=SLICE_BYTES, stage_split=False, max_in_flight=0, group=0, max_slices=MAX_SLICES):
        if mode not in ("auto", "per-rank", "single-context"):
            raise ValueError(f"mode must be auto, per-rank or single-context, got {mode!r}")
        threads, blocks_per_sm = check_int("threads", threads), check_int("blocks_per_sm", blocks_per_sm, 1)
        if max_registers is not None:                  # None: uncapped
            max_registers = check_int("max_registers", max_registers, 16, 255)
        stage_bytes, max_in_flight = (check_int(name, v, 0) for name, v in (
            ("stage_bytes", stage_bytes), ("max_in_flight", max_in_flight)))
        slice_bytes = check_int("slice_bytes", slice_bytes, 1)
        max_parts = check_max_parts(max_parts)
        if not (32 <= threads <= 1024 and threads % 32 == 0):
            raise ValueError(f"threads must be a multiple of 32 in 32..1024, got {threads}")
        self.group, self.max_slices = check_group(group), check_max_slices(max_slices)
        import cupy                                        # the arguments are checked before any GPU work
        from ringlab.gpu.ipc import ipc_usable
        usable, why = ipc_usable(comm)
        if not usable:
            raise ValueError(f"the device ring needs CUDA IPC between all ranks, unusable here: {why}")
        self.comm, self.n, self.rank = comm, comm.size, comm.rank
        self.timeout, self.trace_enabled = resolve_timeout(timeout), bool(trace)
        self.left, self.right = (self.rank - 1) % self.n, (self.rank + 1) % self.n
        self.sharing = len(same_gpu_ranks(comm))
        every = comm.allreduce(int(self.sharing == self.n), op=MPI.MIN)
        self.scope = scope or ("gpu" if every else "sys")
        self.max_registers, self.slice_bytes = max_registers, slice_bytes
        # Every block of every rank must be resident at once (they wait on each other): one block per SM
        # over all the ranks of a GPU, which any SM can hold.
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.threads, self.blocks_per_sm = threads, blocks_per_sm
        self.max_parts = parts_for(max_parts, sms, self.blocks_per_sm, self.sharing)
        self.peers = PeerMemory(comm)
        # words 0..MAX_PARTS-1: part p's progress counter (peers read it); MAX_PARTS..: part p's call count
        self.flags, mapped = self.peers.shared_words(2 * MAX_PARTS, {self.left, self.right})
        self.left_flags, self.right_flags = mapped[self.left], mapped[self.right]
        self.status_dev, self.status = self.peers.host_words(4)
        self.trace_dev, self.trace = self.peers.host_words(2 * self.n + 1)
        self._send = np.zeros(2 * (_HANDLE + 8), np.uint8)
        self._recv = np.zeros_like(self._send)
        self._tables, self._progs, self._keep, self._launchers = {}, {}, [], {}
        self.fallback, self.mode_why = None, "requested"
        comm.Barrier()
        if mode == "auto":
            mode, self.mode_why = self._probe()
        if mode == "single-context":
            from ringlab.gpu.ipc import SharedGpuRing
            if self.sharing != self.n:
                raise RuntimeError("the device ring's kernels do not co-run and the ranks span several GPUs: "
                                   f"no single-context fallback ({self.mode_why})")
            self.fallback = SharedGpuRing(comm, timeout=timeout)
        self.mode = mode
        stage_bytes = comm.allreduce(int(stage_bytes), op=MPI.MIN)     # every rank must take the same path
        self.stage_bytes = 0 if mode == "single-context" or self.n == 1 else stage_bytes // 16 * 16
        self.stage_split, self.max_in_flight = bool(stage_split), int(max_in_flight)
        self._events, self._calls = [], 0
        if self.stage_bytes:        # ours, and our mapping of the left's: the same addresses every call
            halves = 2 if self.stage_split else 1
            self.stage, mapped = self.peers.shared_words(halves * self.stage_bytes // 8, {self.left})
            self.left_stage = mapped[self.left]
            self.stage_out = self.stage + (self.stage_bytes if self.stage_split else 0)
            self.left_stage_out = self.left_stage + (self.stage_bytes if self.stage_split else 0)

    # -- the collective ---------------------------------------------------------------------------
    def allreduce(self, src, out, op="sum", timeout=None):
        """out = reduction of every rank's flat ``src``, enqueued on the caller's current stream."""
        if self.fallback is not None:
            import cupy
            if cupy.cuda.get_current_stream().is_capturing():
                raise RuntimeError("device ring: the single-context fallback (no MPS) rendezvouses with the other "
                                   "ranks on the host each call and cannot be captured in a CUDA graph; start MPS")
            return self.fallback.allreduce(src, out, op, timeout)
        self.check()
        _check_buffers(src, out, op)
        if src.size == 0:
            return True
        if self.n == 1:
            if out.data.ptr != src.data.ptr:
                out[...] = src
            return True
        limit = self.timeout if timeout is None else resolve_timeout(timeout)
        if self.max_in_flight:
            self._throttle()
        if src.nbytes <= self.stage_bytes:
            self._launch_staged(src, out, op, limit)
        else:
            self._launch(src, out, op, limit)
        if self.max_in_flight:
            self._events[self._calls % self.max_in_flight].record()
            self._calls += 1
        return True

    def _throttle(self):
        """Wait (host) for the call max_in_flight calls back: keeps the GPU queue shallow."""
        import cupy
        if not self._events:
            self._events = [cupy.cuda.Event(disable_timing=True) for _ in range(self.max_in_flight)]
        if self._calls >= self.max_in_flight:
            self._events[self._calls % self.max_in_flight].synchronize()

    def _launch_staged(self, src, out, op, limit):
        """The kernel copies src into our stage, runs the ring in place on the stages (the left's mapped once)
        and copies the result to out: no host message, one launch."""
        import cupy
        trace = self.trace_enabled
        key = (src.data.ptr, out.data.ptr, src.size, trace)
        table = self._tables.get(key)
        if table is None:
            table = self._table(key, self.stage, self.stage_out, self.left_stage, self.left_stage_out, trace,
                                first=first_chunk(src.size, self.n, self.rank), stage_in=src.data.ptr,
                                stage_out=out.data.ptr, stage_count=src.size)
        self._run(src, op, table, limit, cupy.cuda.get_current_stream())

    def _launch(self, src, out, op, limit, trace=None):
        """The ring on the caller's buffers: swap their handles with the neighbours first (zero copy)."""
        import cupy
        left_src, left_out = self._swap_with_neighbours(src, out)
        trace = self.trace_enabled if trace is None else trace
        key = (src.data.ptr, out.data.ptr, left_src, left_out, trace)
        table = self._tables.get(key)
        if table is None:
            table = self._table(key, src.data.ptr, out.data.ptr, left_src, left_out, trace)
        self._run(src, op, table, limit, cupy.cuda.get_current_stream())

    def _table(self, key, src, out, left_src, left_out, trace, **staged):
        row = address_row(src, out, left_src, left_out, self.flags + 0, self.left_flags, self.right_flags,
                          self.status_dev, self.trace_dev if trace else 0, self.flags + 8 * MAX_PARTS, self.rank, self.n,
                          **staged)
        return self._cached(self._tables, key, np.array([row], np.int64))

    def _run(self, src, op, table, limit, stream):
        """One cuLaunchKernel of the (dtype, op) kernel for ``src.size`` elements on ``stream``."""
        prog = self._progs.get(src.size)
        if prog is None:
            prog = self._cached(self._progs, src.size, program_table(self.n, src.size, [self.rank]))
        fast = self._launchers.get((src.dtype, op))
        if fast is None:
            fast = self._launcher(src.dtype, op)
        parts, slices = launch_shape(self.n, src.size, src.itemsize, fast.max_parts, self.slice_bytes, self.max_slices)
        fast(parts, fast.threads, stream.ptr, table.data.ptr, prog.data.ptr, 2 * self.n - 1, slices,
             0 if limit is None else int(limit * 1e9))

    def _launcher(self, dtype, op):
        """The compiled kernel's driver launcher, with threads and parts it can hold resident."""
        from ringlab.kernels.ring_kernel import ring_kernel
        fast = DriverLaunch.for_kernel(ring_kernel(dtype, op, scope=self.scope, max_registers=self.max_registers,
                                                      group=self.group))
        fast.threads = min(self.threads, fast.attribute("MAX_THREADS_PER_BLOCK") // 32 * 32)
        resident = fast.blocks_per_sm(fast.threads)
        if resident < 1:
            raise RuntimeError(f"device ring: the {np.dtype(dtype).name} {op} kernel cannot run {fast.threads} threads")
        fast.max_parts = self.max_parts if resident >= self.blocks_per_sm else \
            max(1, self.max_parts * resident // self.blocks_per_sm)
        self._launchers[(dtype, op)] = fast
        return fast

    def _swap_with_neighbours(self, src, out):
        """Send our (src, out) handles right, receive the left's; return our addresses of the left's buffers."""
        (hs, os_), (ho, oo) = self.peers.export(src), self.peers.export(out)
        buf, h = self._send, _HANDLE
        buf[:h] = np.frombuffer(hs, np.uint8)
        buf[h + 8: 2 * h + 8] = np.frombuffer(ho, np.uint8)
        buf[h: h + 8].view(np.int64)[0] = os_
        buf[2 * h + 8:].view(np.int64)[0] = oo
        reqs = [self.comm.Irecv(self._recv, self.left, 77), self.comm.Isend(buf, self.right, 77)]
        if not MPI.Request.Testall(reqs):                 # bounded: a stalled neighbour must not hang the host
            deadline = None if self.timeout is None else time.monotonic() + self.timeout
            while not MPI.Request.Testall(reqs):
                if deadline is not None and time.monotonic() > deadline:
                    exc = CollectiveTimeout(f"rank {self.rank}: device ring: rank {self.left} did not join the call "
                                            f"within {self.timeout:g} s", peer=self.left, rank=self.rank)
                    handle_timeout(exc)
                    raise exc
                os.sched_yield()
        r = self._recv
        left_src = self.peers.open(r[:h].tobytes()) + int(r[h: h + 8].view(np.int64)[0])
        left_out = self.peers.open(r[h + 8: 2 * h + 8].tobytes()) + int(r[2 * h + 8:].view(np.int64)[0])
        return left_src, left_out

    @property
    def opened(self):
        """Peer mappings held (the leak check counts them, as for the IPC rings)."""
        return self.peers.opened

    # -- errors, traces, mode (check and synchronize: persistent.py) -----------------------------------
    def _stalled_at(self):
        return f"primitive {int(self.status[2])}"

    def last_trace(self):
        """globaltimer ns of the last traced call: kernel start, end of primitives 1..2N-2, exit (after a sync)."""
        return self.trace.copy()

    def _probe(self):
        """("per-rank" | "single-context", why): does a traced call finish fast once every rank has started?"""
        import cupy
        x = cupy.ones(max(self.n, 1), cupy.float32)
        y = cupy.empty_like(x)

        def load_kernel():             # before the barrier: ranks then start together
            if (x.dtype, "sum") not in self._launchers:
                self._launcher(x.dtype, "sum")
        mode, why, _ = probe(self, "single-context", lambda: self._launch(x, y, "sum", 5.0, trace=True),
                             lambda: (y == self.n).all(), 2 * self.n - 1, [(self.flags, 16 * MAX_PARTS)],
                             load_kernel)
        return mode, why

    def close(self):
        if self.fallback is not None:
            self.fallback.close()
        try:
            import cupy
            cupy.cuda.runtime.deviceSynchronize()
        except Exception:  # pragma: no cover
            pass
        self._tables.clear(), self._progs.clear(), self._keep.clear()
        self.peers.close()


_KERNEL_DTYPES = frozenset(np.dtype(d) for d in KERNEL_DTYPES)    # dtype objects: no name lookup per call


def _check_buffers(src, out, op):
    """Clear errors for what the kernel cannot take (the same answer on every rank for agreed arguments)."""
    if src.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"the device ring has no kernel for {src.dtype.name}; supported: {', '.join(KERNEL_DTYPES)}")
    if op not in KERNEL_OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(KERNEL_OPS)}")
    for name, a in (("src", src), ("out", out)):
        if a.ndim != 1 or not a.flags.c_contiguous or not hasattr(a, "data"):
            raise ValueError(f"the device ring needs flat C-contiguous device arrays; {name} is not")
    if out.size != src.size or out.dtype != src.dtype:
        raise ValueError(f"out must match src ({src.size} {src.dtype.name}), got {out.size} {out.dtype.name}")


def get_device_ring(comm, timeout=None, mode="auto"):
    """The device ring cached on ``comm`` (created collectively on first use, closed with the communicator)."""
    from ringlab.gpu.ipc import cached_executor
    return cached_executor(comm, ("device-ring", mode), lambda: DeviceRing(comm, timeout=timeout, mode=mode))
