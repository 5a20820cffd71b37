"""Device FP8 all-reduce: ONE launch per call of the ring kernel with the FP8 codec, or of the fp8-direct kernel.

Send buffers (codes + block scales) are mapped once per communicator; without co-resident kernels (no MPS)
the ring falls back to the host-driven FP8 IPC ring (gpu/fp8_ipc.py). Same bits as collectives/fp8.py.
"""
import warnings

import numpy as np
from mpi4py import MPI

from ringlab.errors import resolve_timeout
from ringlab.gpu.device_plan import (address_row, check_max_parts, check_max_slices, chunk_blocks, direct_row,
                                     first_chunk, fp8_send_layout, launch_shape, parts_for, program_table)
from ringlab.gpu.peer_memory import PeerMemory, same_gpu_ranks
from ringlab.gpu.persistent import DriverLaunch, cached, check, probe, synchronize
from ringlab.kernels.formats import check_fp8_input_dtype
from ringlab.kernels.fp8_ring_codec import FP8_KERNEL_OPS, WARP, tiled_fp8_codec
from ringlab.kernels.ring_kernel import MAX_PARTS, MAX_SLICES, STATUS_OK, check_group, fp8_codec
from ringlab.kernels.ring_layout import check_int

__all__ = ["DeviceFp8Ring", "get_device_fp8_ring", "settle_mode", "launch_defaults", "DEFAULT_CAPACITY",
           "DEVICE_FP8_ALGOS", "LAUNCH"]

DEFAULT_CAPACITY = 1 << 26          # elements per call (256 MB of fp32): 64 MiB of codes + scales per rank
# default (threads, register cap, tiles, fwd_tiles) per algo, one block per SM: each the fastest shape measured
# for it that also passed the full device check (docs/fp8.md, "Launch shapes per algorithm")
LAUNCH = {"fp8-ring": (1024, 64, 1, 2), "fp8-direct": (768, 80, 1, 4)}
SLICE_BYTES = 4 << 20              # per block per slice, at least (fp8-ring): fewer drains, as the fp32 ring
                                    # (docs/fp8.md, "A profile, then fewer slices": 256 KB before)
DEVICE_FP8_ALGOS = ("fp8-ring", "fp8-direct")
_ALIASES = {"ring": "fp8-ring", "direct": "fp8-direct"}


class DeviceFp8Ring:
    """FP8 all-reduce by one persistent kernel per rank; ``algo``, ``fmt``, ``block`` fixed here. ``mode``: "auto"
    (probe), "per-rank" or "host" (the fp8_ipc ring; fp8-direct keeps its kernel: "time-sliced"). ``scope`` of the
    flags: None picks "gpu" when every rank runs on this GPU, else "sys" (as DeviceRing). Launch shape (no bits):
    ``threads`` x ``max_registers``, ``tiles`` / ``fwd_tiles`` (blocks per lane group and round,
    kernels/fp8_ring_tiles.py; tiles 0: untiled), each None: LAUNCH[algo] (see launch_defaults); ``blocks_per_sm``
    (sets the default max_parts); ``warp_steps`` (> 0: the warp tiles of kernels/fp8_ring_warps.py instead, that
    many quads per lane); fp8-ring only: ``slice_bytes`` (the least a block codes between two flag updates),
    ``max_slices`` (<= 64) and ``group`` (slices per group of the walk, 0: all; ring_kernel.py's check_group);
    ``prefetch``: rounds ahead the lane groups ask L2 for (kernels/fp8_ring_tiles.py; 0: measured slower,
    docs/fp8.md)."""
    STATUS_OK, _table_label = STATUS_OK, "device FP8 all-reduce"              # for persistent.py's methods
    check, synchronize, _cached = check, synchronize, cached

    def __init__(self, comm, fmt="e4m3", block=128, algo="fp8-ring", timeout=None, capacity=DEFAULT_CAPACITY,
                 mode="auto", trace=False, max_parts=None, threads=None, max_registers=None, scope=None,
                 tiles=None, fwd_tiles=None, blocks_per_sm=1, warp_steps=WARP, slice_bytes=SLICE_BYTES,
                 group=0, max_slices=MAX_SLICES, prefetch=0):
        self.codec = fp8_codec(fmt, block)
        self.algo = _ALIASES.get(algo, algo)
        if self.algo not in DEVICE_FP8_ALGOS:
            raise ValueError(f"unknown FP8 algo {algo!r}; expected one of {', '.join(DEVICE_FP8_ALGOS)}")
        threads, max_registers, blocks_per_sm = launch_defaults(self.algo, threads, max_registers, blocks_per_sm)
        tiles, fwd_tiles = (d if v is None else v for v, d in zip((tiles, fwd_tiles), LAUNCH[self.algo][2:]))
        if mode not in ("auto", "per-rank", "host"):
            raise ValueError(f"mode must be auto, per-rank or host, got {mode!r}")
        if not (32 <= int(threads) <= 1024 and int(threads) % 32 == 0) or \
                int(blocks_per_sm) < 1 or int(blocks_per_sm) * int(threads) * int(max_registers) > 65536:
            raise ValueError(f"threads must be a multiple of 32 in 32..1024 with blocks_per_sm x threads x "
                             f"max_registers <= 65536, got {blocks_per_sm} x {threads} x {max_registers}")
        self.tiled = tiled_fp8_codec(fmt, block, tiles, fwd_tiles, warp_steps, prefetch)   # the kernels' (same bits)
        if self.algo == "fp8-direct" and self.tiled.tiles == 2:        # docs/fp8.md: its probe call never finished
            raise ValueError("fp8-direct with tiles=2 did not complete a call on the H200 (spilling owner loop); "
                             "use tiles 0 or 1")
        self.group, self.max_slices = check_group(group), check_max_slices(max_slices)
        max_parts = check_max_parts(max_parts)
        capacity = check_int("capacity", capacity, 1)                  # elements per call
        self.slice_bytes = check_int("slice_bytes", slice_bytes, 1)
        walk = (self.group, self.max_slices, self.slice_bytes)
        if self.algo == "fp8-direct" and walk != (0, MAX_SLICES, SLICE_BYTES):
            raise ValueError("group, max_slices and slice_bytes shape fp8-ring's walk; fp8-direct has no slices")
        import cupy                                        # the arguments are checked before any GPU work
        from ringlab.gpu.ipc import ipc_usable
        usable, why = ipc_usable(comm)
        if not usable:
            raise ValueError(f"the device FP8 all-reduce needs CUDA IPC between all ranks, unusable here: {why}")
        self.comm, self.n, self.rank = comm, comm.size, comm.rank
        self.left, self.right = (self.rank - 1) % self.n, (self.rank + 1) % self.n
        self.timeout, self.trace_enabled, self.threads = resolve_timeout(timeout), bool(trace), int(threads)
        self.capacity = comm.allreduce(capacity, op=MPI.MIN)           # the same bound on every rank
        self.sharing = len(same_gpu_ranks(comm))
        every = comm.allreduce(int(self.sharing == self.n), op=MPI.MIN)
        self.scope, self.max_registers = scope or ("gpu" if every else "sys"), int(max_registers)
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.max_parts = parts_for(max_parts, sms, blocks_per_sm, self.sharing)
        self.peers = PeerMemory(comm)
        self.fallback, self.mode_why, self._probe_ok = None, "requested", True
        self._tables, self._progs, self._keep, self._launchers = {}, {}, [], {}
        self._map_buffers()
        comm.Barrier()
        if mode == "auto":
            mode, self.mode_why = self._probe()
        mode, slow = settle_mode(self.algo, mode, self._probe_ok, self.mode_why)
        if slow and self.rank == 0:
            warnings.warn(slow, RuntimeWarning, stacklevel=2)
        if mode == "host":
            from ringlab.gpu.fp8_ipc import get_fp8_ipc_ring
            self.fallback = get_fp8_ipc_ring(comm, self.codec.fmt, self.codec.block)
        self.mode = mode

    def _map_buffers(self):
        """Counters and the send buffer (codes | scales), ours and our mappings of the ranks that read them."""
        readers = {self.left, self.right} if self.algo == "fp8-ring" else set(range(self.n))
        self.flags, fmap = self.peers.shared_words(2 * MAX_PARTS, readers)
        self.codes_bytes, scale_bytes = fp8_send_layout(self.capacity, self.n, self.codec.block)
        self.send, smap = self.peers.shared_words(-(-(self.codes_bytes + scale_bytes) // 8), readers)
        self.status_dev, self.status = self.peers.host_words(4)
        self.trace_dev, self.trace = self.peers.host_words(2 * self.n + 1)
        self.left_flags, self.right_flags = fmap.get(self.left, 0), fmap.get(self.right, 0)
        self.left_send = smap.get(self.left, 0)
        self.peer_table = None
        if self.algo == "fp8-direct":
            import cupy
            self.peer_table = cupy.asarray(np.array([[smap[q], smap[q] + self.codes_bytes, fmap[q]]
                                                     for q in range(self.n)], np.int64))

    # -- the collective ---------------------------------------------------------------------------
    def allreduce(self, src, out, op="sum", timeout=None):
        """out = FP8 all-reduce of every rank's flat ``src`` (``out`` may be ``src``), on the current stream."""
        _check_buffers(src, out, op, self.capacity)
        if self.fallback is not None:
            return self.fallback.allreduce(src, out, op, timeout)
        self.check()
        if src.size == 0:
            return out
        if self.n == 1:
            if out.data.ptr != src.data.ptr:
                out[...] = src
            return out
        self._launch(src, out, op, self.timeout if timeout is None else resolve_timeout(timeout))
        return out

    def _launch(self, src, out, op, limit, trace=None):
        import cupy
        from ringlab.kernels.device import launch
        trace = self.trace_enabled if trace is None else trace
        count, stream = src.size, cupy.cuda.get_current_stream()
        key = (src.data.ptr, out.data.ptr, count, trace)
        table = self._tables.get(key)
        if table is None:
            table = self._cached(self._tables, key, self._row(src.data.ptr, out.data.ptr, count, trace), stream)
        parts, slices = launch_shape(self.n, count, src.itemsize, self.max_parts, self.slice_bytes, self.max_slices)
        limit_ns = 0 if limit is None else int(limit * 1e9)
        if self.algo == "fp8-ring":
            prog = self._progs.get(count)
            if prog is None:
                prog = self._cached(self._progs, count, program_table(self.n, count, [self.rank]), stream)
            args = (table.data.ptr, prog.data.ptr, 2 * self.n - 1, slices, limit_ns)
        else:
            args = (table.data.ptr, self.n, count, 0, limit_ns)
        kern = self._kernel(src.dtype, op)
        fast = self._launchers.get(kern)
        if fast is None:      # first launch through numba (compiles, checks), then straight to the driver
            launch(kern, (parts, 1), (self.threads, 1), np.uint64(args[0]), *self._typed(args[1:]))
            self._launchers[kern] = DriverLaunch.for_kernel(kern)
            return
        fast(parts, self.threads, stream.ptr, *args)

    def _typed(self, rest):
        if self.algo == "fp8-ring":
            return np.uint64(rest[0]), np.int64(rest[1]), np.int64(rest[2]), np.uint64(rest[3])
        return np.int64(rest[0]), np.int64(rest[1]), np.int64(rest[2]), np.uint64(rest[3])

    def _kernel(self, dtype, op):
        if self.algo == "fp8-ring":
            from ringlab.kernels.ring_kernel import ring_kernel
            return ring_kernel(dtype, op, self.tiled, scope=self.scope, max_registers=self.max_registers,
                               group=self.group)
        from ringlab.kernels.fp8_direct_kernel import direct_kernel
        return direct_kernel(dtype, op, self.codec.fmt, self.codec.block, self.scope, self.max_registers,
                             self.tiled.tiles, self.tiled.fwd_tiles, self.tiled.warp_steps, self.tiled.prefetch)

    def _row(self, src, out, count, trace):
        nbc, tr, calls = chunk_blocks(count, self.n, self.codec.block), self.trace_dev if trace else 0, self.flags + 8 * MAX_PARTS
        if self.algo == "fp8-direct":
            row = direct_row(src, out, self.send, self.send + self.codes_bytes, self.flags, self.status_dev, tr, calls,
                             self.rank, nbc, self.peer_table.data.ptr)
        else:
            row = address_row(src, out, 0, 0, self.flags, self.left_flags, self.right_flags, self.status_dev, tr,
                              calls, self.rank, self.n, send_codes=self.send, send_scales=self.send + self.codes_bytes,
                              left_codes=self.left_send, left_scales=self.left_send + self.codes_bytes,
                              blocks_per_chunk=nbc, first=first_chunk(count, self.n, self.rank))
        return np.array([row], np.int64)

    # -- errors, traces, mode (check and synchronize: persistent.py) -----------------------------------
    @property
    def _label(self):
        return f"device {self.algo}"

    def _stalled_at(self):
        return f"{'primitive' if self.algo == 'fp8-ring' else 'phase'} {int(self.status[2])}"

    def _probe(self):
        """("per-rank" | "host", why): does a traced call finish fast once every rank has started?"""
        import cupy
        x = cupy.ones(max(self.n, 1) * self.codec.block, cupy.float32)
        y = cupy.empty_like(x)
        launch = None if self.n == 1 else lambda: self._launch(x, y, "sum", 5.0, trace=True)
        mode, why, self._probe_ok = probe(self, "host", launch, lambda: cupy.isfinite(y).all(),
                                          2 * self.n - 1 if self.algo == "fp8-ring" else 3,
                                          [(self.flags, 16 * MAX_PARTS)],
                                          lambda: self._kernel(np.dtype(np.float32), "sum"), agree_ok=True)
        return mode, why

    @property
    def opened(self):
        """Peer mappings held (the leak check counts them)."""
        return self.peers.opened

    def close(self):
        try:
            import cupy
            cupy.cuda.runtime.deviceSynchronize()
        except Exception:  # pragma: no cover
            pass
        self._tables.clear(), self._progs.clear(), self._keep.clear()
        self.peer_table = None
        self.peers.close()


def _check_buffers(src, out, op, capacity):
    """Clear errors for what the kernels cannot take (the same answer on every rank for agreed arguments)."""
    check_fp8_input_dtype(src.dtype)                    # integers: TypeError
    if src.dtype.name not in ("float32", "float16"):
        raise TypeError(f"the device FP8 all-reduce takes CuPy float32 or float16 buffers, got {src.dtype.name}")
    if op not in FP8_KERNEL_OPS:
        raise ValueError(f"FP8 all-reduce supports op {' or '.join(FP8_KERNEL_OPS)}, got {op!r}")
    for name, a in (("src", src), ("out", out)):
        if a.ndim != 1 or not a.flags.c_contiguous or not hasattr(a, "data"):
            raise ValueError(f"the device FP8 all-reduce needs flat C-contiguous device arrays; {name} is not")
    if out.size != src.size or out.dtype != src.dtype:
        raise ValueError(f"out must match src ({src.size} {src.dtype.name}), got {out.size} {out.dtype.name}")
    if src.size > capacity:
        raise ValueError(f"the device FP8 all-reduce was built for up to {capacity} elements per call, got {src.size}; "
                         "create it with a larger capacity= (a split call would not match the host FP8 path's bits)")


def launch_defaults(algo, threads, max_registers, blocks_per_sm):
    """(threads, max_registers, blocks_per_sm) as checked ints: None takes LAUNCH[algo], except that ``threads`` given
    without ``max_registers`` gets the most registers that still fill the SM (65536 / (blocks x threads), a multiple
    of 8, at most 255: 512 -> 128, 768 -> 80, 1024 -> 64), the pairs measured in docs/fp8.md."""
    blocks_per_sm = check_int("blocks_per_sm", blocks_per_sm)
    if threads is None:
        threads = LAUNCH[algo][0]
    elif max_registers is None:
        threads = check_int("threads", threads)
        if blocks_per_sm >= 1 and threads >= 32:
            max_registers = min(255, 65536 // (blocks_per_sm * threads) // 8 * 8)
    if max_registers is None:
        max_registers = LAUNCH[algo][1]
    return check_int("threads", threads), check_int("max_registers", max_registers), blocks_per_sm


def settle_mode(algo, mode, probe_ok, why):
    """(mode, warning or None) after the probe: "host" means the kernels do not co-run. fp8-ring then hands calls to
    the host-driven FP8 IPC ring; fp8-direct has none, and its three barriers per call still complete as the
    contexts time-slice, so it keeps its kernel ("time-sliced", tens of milliseconds a call: docs/fp8.md) with a
    warning, unless the probe call itself did not finish (a RuntimeError naming the other routes)."""
    if mode != "host" or algo != "fp8-direct":
        return mode, None
    if not probe_ok:
        raise RuntimeError("device fp8-direct: the per-rank kernels did not complete a probe call (start MPS); "
                           f"use ringlab.allreduce_fp8(algo='fp8-direct', transport='staged' or 'mpi') ({why})")
    return "time-sliced", ("device fp8-direct runs time-sliced: the ranks' kernels do not co-run on this GPU "
                           f"({why}), so every call waits for the contexts' time slices (tens of milliseconds); "
                           "start MPS, or use transport='staged' / 'mpi', or algo='fp8-ring' (its host-driven "
                           "fallback is faster here; docs/fp8.md)")


def get_device_fp8_ring(comm, fmt="e4m3", block=128, algo="fp8-ring", timeout=None, capacity=DEFAULT_CAPACITY):
    """The device FP8 executor for (fmt, block, algo, capacity) cached on ``comm`` (created collectively)."""
    from ringlab.gpu.ipc import cached_executor
    codec = fp8_codec(fmt, block)
    algo = _ALIASES.get(algo, algo)
    key = ("device-fp8", algo, codec.fmt, codec.block, int(capacity))
    return cached_executor(comm, key, lambda: DeviceFp8Ring(comm, codec.fmt, codec.block, algo, timeout, capacity))
