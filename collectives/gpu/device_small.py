"""One-shot / two-shot all-reduce on the device: one persistent-kernel launch per rank per call, no host step.

Scratch buffers and counters are mapped once at construction (docs/device_small.md); a call enqueues one
cuLaunchKernel on the caller's stream. Without co-resident kernels it hands calls to ipc_direct (mode "fallback").
"""
import json
import math
import os
import warnings

import numpy as np
from mpi4py import MPI

from ringlab import settings
from ringlab.commstate import comm_state
from ringlab.errors import resolve_timeout
from ringlab.gpu.device_plan import check_max_parts, parts_for
from ringlab.gpu.peer_memory import PeerMemory, same_gpu_ranks
from ringlab.gpu.persistent import THREADS, DriverLaunch, check, probe, synchronize
from ringlab.kernels.ring_layout import check_int
from ringlab.kernels.small_kernel import (ALGOS, KERNEL_DTYPES, KERNEL_OPS, MAX_PARTS, MAX_RANKS, STATUS_OK,
                                          TRACE_WORDS, launch_parts, table_row)

__all__ = ["DeviceSmallAllreduce", "get_device_small", "choose_device_algorithm", "device_auto_choice",
           "default_crossovers", "crossovers_from_rows", "load_device_table", "CAPACITY", "MODES"]

CAPACITY = 2 << 20         # bytes per scratch half (two halves per rank): the largest message these kernels take
MODES = ("auto", "per-rank", "fallback")
_PHASE_NAMES = {1: "waiting for its input", 2: "waiting for its reduced chunk"}


class DeviceSmallAllreduce:
    """One-shot or two-shot all-reduce (``algo`` fixed here) by one persistent kernel per rank. Collective.
    ``scope`` of the flags: None picks "gpu" when every rank runs on this GPU, else "sys" (as DeviceRing)."""
    STATUS_OK, check, synchronize = STATUS_OK, check, synchronize                # persistent.py's methods

    def __init__(self, comm, algo="oneshot", timeout=None, mode="auto", capacity=CAPACITY, max_parts=None,
                 scope=None):
        if algo not in ALGOS:
            raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {algo!r}")
        if scope not in (None, "gpu", "sys"):
            raise ValueError(f"scope must be None, 'gpu' or 'sys', got {scope!r}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        max_parts = check_max_parts(max_parts)
        capacity = check_int("capacity", capacity, 64)                 # bytes per call
        import cupy                                        # the arguments are checked before any GPU work
        from ringlab.gpu.ipc import ipc_usable
        usable, why = ipc_usable(comm)
        if not usable:
            raise ValueError(f"device {algo} needs CUDA IPC between all ranks, unusable here: {why}")
        if comm.size > MAX_RANKS:
            raise ValueError(f"device {algo}: at most {MAX_RANKS} ranks, the communicator has {comm.size}")
        self.comm, self.algo, self.n, self.rank = comm, algo, comm.size, comm.rank
        self.timeout = resolve_timeout(timeout)
        self.capacity = comm.allreduce(capacity, op=MPI.MIN) // 64 * 64   # the same limit on every rank
        self.sharing = len(same_gpu_ranks(comm))
        every = comm.allreduce(int(self.sharing == self.n), op=MPI.MIN)
        self.scope = scope or ("gpu" if every else "sys")     # flags: gpu when every rank runs on this GPU
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.max_parts = parts_for(max_parts, sms, 1, self.sharing)                     # every block resident
        everyone = set(range(self.n))
        self.peers = PeerMemory(comm)
        self.flags, flags = self.peers.shared_words(MAX_PARTS, everyone)        # per-part counters, peers read
        self.calls, _ = self.peers.shared_words(MAX_PARTS, {self.rank})         # per-part call counts, ours
        self.scratch, scratch = self.peers.shared_words(2 * self.capacity // 8, everyone)
        self.status_dev, self.status = self.peers.host_words(4)
        self.trace_dev, self.trace = self.peers.host_words(TRACE_WORDS)
        rows = {t: table_row([scratch[q] for q in range(self.n)], [flags[q] for q in range(self.n)],
                             self.status_dev, self.calls, self.trace_dev if t else 0, self.rank, self.n,
                             self.capacity) for t in (False, True)}
        self._tables = {t: cupy.asarray(np.array([row], np.int64)) for t, row in rows.items()}
        cupy.cuda.runtime.deviceSynchronize()
        self._launchers = {}
        self.fallback, self.mode_why = None, "requested"
        comm.Barrier()
        if mode == "auto":
            mode, self.mode_why = self._probe()
        if mode == "fallback":
            from ringlab.gpu.ipc_direct import get_ipc_direct
            self.fallback = get_ipc_direct(comm, self.algo)
        self.mode = mode

    # -- the collective ---------------------------------------------------------------------------
    def allreduce(self, src, out, op="sum", timeout=None):
        """out = reduction of every rank's flat ``src`` (bitwise the host ring's), on the caller's stream."""
        _check_buffers(src, out, op, self.algo)
        if src.nbytes > self.capacity:
            raise ValueError(f"device {self.algo}: {src.nbytes} bytes exceed the scratch capacity "
                             f"{self.capacity} bytes; use the device ring (algo='ring', transport='device') "
                             "or algo='auto', which picks the ring above it")
        if self.fallback is not None:
            import cupy
            if cupy.cuda.get_current_stream().is_capturing():
                raise RuntimeError(f"device {self.algo}: the fallback without co-resident kernels (no MPS) "
                                   "rendezvouses on the host each call and cannot be captured; start MPS")
            return self.fallback.allreduce(src, out, op, timeout)
        self.check()
        if src.size == 0:
            return True
        if self.n == 1:
            if out.data.ptr != src.data.ptr:
                out[...] = src
            return True
        limit = self.timeout if timeout is None else resolve_timeout(timeout)
        self._launch(src, out, op, limit, False)
        return True

    def _launch(self, src, out, op, limit, trace):
        import cupy
        stream = cupy.cuda.get_current_stream()
        fast = self._launchers.get((src.dtype, op))
        if fast is None:
            if stream.is_capturing():
                raise RuntimeError(f"device {self.algo}: the first call with {src.dtype.name} {op} loads the "
                                   "kernel and cannot be captured in a CUDA graph; run it once before capturing")
            fast = self._launchers[(src.dtype, op)] = self._launcher(src.dtype, op)
        parts = launch_parts(self.algo, self.n, src.size, src.itemsize, min(self.max_parts, fast.max_parts))
        fast(parts, fast.threads, stream.ptr, src.data.ptr, out.data.ptr, src.size, self._tables[trace].data.ptr,
             0 if limit is None else int(limit * 1e9))

    def _launcher(self, dtype, op):
        """The compiled kernel's driver launcher, with as many threads and parts as stay resident."""
        from ringlab.kernels.small_kernel import small_kernel
        fast = DriverLaunch.for_kernel(small_kernel(dtype, op, self.algo, self.scope))
        try:                                            # a query the driver refuses leaves the defaults
            fast.threads = max(32, min(THREADS, fast.attribute("MAX_THREADS_PER_BLOCK") // 32 * 32))
        except RuntimeError:
            fast.threads = THREADS
        try:
            resident = fast.blocks_per_sm(fast.threads)
        except RuntimeError:
            resident = 1
        if resident < 1:
            raise RuntimeError(f"device {self.algo}: the {np.dtype(dtype).name} {op} kernel cannot run "
                               f"{fast.threads} threads per block")
        fast.max_parts = self.max_parts
        return fast

    @property
    def opened(self):
        """Peer mappings held (the leak check counts them)."""
        return self.peers.opened

    # -- errors, traces, mode (check and synchronize: persistent.py) -----------------------------------
    @property
    def _label(self):
        return f"device {self.algo}"

    def _stalled_at(self):
        phase, call = int(self.status[2]), int(self.status[3])
        return f"{_PHASE_NAMES.get(phase, f'phase {phase}')}, call {call}"

    def traced_call(self, src, out, op="sum", timeout=None):
        """One call that records %globaltimer ns (start, inputs ready, reduced, exit) of block 0; synchronizes."""
        import cupy
        _check_buffers(src, out, op, self.algo)
        if self.fallback is not None or self.n == 1 or src.size == 0:
            raise RuntimeError(f"device {self.algo}: traces need the per-rank kernels and a non-empty buffer")
        self._launch(src, out, op, self.timeout if timeout is None else resolve_timeout(timeout), True)
        cupy.cuda.get_current_stream().synchronize()
        self.check()
        return self.trace.copy()

    def _probe(self):
        """("per-rank" | "fallback", why): does a traced call finish fast once every rank has started?"""
        import cupy
        if self.n == 1:
            return "per-rank", "one rank: nothing to wait for"
        x = cupy.ones(self.n, cupy.float32)
        y = cupy.empty_like(x)

        def load_kernel():             # before the barrier: ranks then start together
            if (x.dtype, "sum") not in self._launchers:
                self._launchers[(x.dtype, "sum")] = self._launcher(x.dtype, "sum")
        mode, why, _ = probe(self, "fallback", lambda: self._launch(x, y, "sum", 5.0, True),
                             lambda: (y == self.n).all(), TRACE_WORDS - 1,
                             [(self.flags, 8 * MAX_PARTS), (self.calls, 8 * MAX_PARTS)], load_kernel)
        return mode, why

    def close(self):
        """Free scratch and counters after every rank's kernels are done (collective)."""
        try:
            import cupy
            cupy.cuda.runtime.deviceSynchronize()
            self.comm.Barrier()        # a peer may still read our scratch until its last kernel ended
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass
        self._tables.clear()
        self.peers.close()
        try:
            from ringlab.gpu.peer_memory import forget_executor
            forget_executor(self)
        except ImportError:  # pragma: no cover - older peer_memory
            pass


def _check_buffers(src, out, op, algo):
    """Clear errors for what the kernels cannot take (the same answer on every rank for agreed arguments)."""
    for name, a in (("src", src), ("out", out)):
        if not hasattr(a, "data") or not hasattr(a.data, "ptr") or a.ndim != 1 or not a.flags.c_contiguous:
            raise ValueError(f"device {algo} needs flat C-contiguous device (CuPy) arrays; {name} is not")
    if src.dtype.name not in KERNEL_DTYPES:
        raise TypeError(f"device {algo} has no kernel for {src.dtype.name}; supported: {', '.join(KERNEL_DTYPES)}")
    if op not in KERNEL_OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(KERNEL_OPS)}")
    if op == "avg" and src.dtype.kind != "f":
        raise TypeError(f"op 'avg' needs a floating dtype, not {src.dtype.name}")
    if out.size != src.size or out.dtype != src.dtype:
        raise ValueError(f"out must match src ({src.size} {src.dtype.name}), got {out.size} {out.dtype.name}")
    a, b = src.data.ptr, out.data.ptr
    if a != b and a < b + out.nbytes and b < a + src.nbytes:
        raise ValueError(f"device {algo}: src and out overlap without being the same buffer")


def get_device_small(comm, algo, timeout=None, mode="auto"):
    """The ``algo`` executor cached on ``comm`` (created collectively on first use, closed with the communicator)."""
    from ringlab.gpu.ipc import cached_executor
    return cached_executor(comm, ("device-small", algo, mode),
                           lambda: DeviceSmallAllreduce(comm, algo, timeout=timeout, mode=mode))


# ---- algo="auto" on device arrays: one-shot, two-shot or the device ring by size and N ---------------

def default_crossovers(nranks):
    """Untuned crossovers (a cost argument, not a measurement): one-shot while every rank's N-fold read of the
    buffer stays <= 256 KB, two-shot up to 8 MB / N, then the ring. The device bench measures the real ones."""
    n = max(int(nranks), 1)
    one = max(4096, (256 << 10) // n)
    return {"oneshot_max_bytes": one, "twoshot_max_bytes": max(one, (8 << 20) // n)}


def load_device_table(path=None):
    """The tuning file (the host tuner's, ``$RINGLAB_TUNING`` or ~/.cache/ringlab/tuning.json) or None."""
    path = path or settings.get("RINGLAB_TUNING") or os.path.join(os.path.expanduser("~"), ".cache", "ringlab",
                                                                   "tuning.json")
    try:
        with open(path) as f:
            table = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        warnings.warn(f"ringlab device auto: ignoring unreadable tuning file {path}: {exc}")
        return None
    return table if isinstance(table, dict) else None


def _entry(table, n):
    device = (table or {}).get("device") or {}
    if not isinstance(device, dict) or not device:
        return default_crossovers(n)
    key = str(n) if str(n) in device else min(device, key=lambda k: (abs(math.log2(int(k)) - math.log2(max(n, 1))),
                                                                        int(k)))
    entry = dict(default_crossovers(n))
    entry.update({k: int(v) for k, v in device[key].items() if k in entry})
    return entry


def choose_device_algorithm(nbytes, nranks, table=None, capacity=CAPACITY):
    """"oneshot", "twoshot" or "ring" for one all-reduce of ``nbytes`` on ``nranks`` GPU ranks: the tuning
    table's ``device`` crossovers for this N (else the nearest measured N, else default_crossovers).
    Pure in its arguments, so ranks that agree on the table agree on the pick."""
    entry = _entry(table, nranks)
    if nbytes > capacity:
        return "ring"
    if nbytes <= entry["oneshot_max_bytes"]:
        return "oneshot"
    return "twoshot" if nbytes <= entry["twoshot_max_bytes"] else "ring"


def crossovers_from_rows(times, beyond=None):
    """Crossovers from measured ``{algo: {bytes: us}}``: the largest size one-shot is fastest at, and the largest
    size one-shot or two-shot beats the ring at (what the device bench writes into the tuning file). If two-shot
    still wins at the largest size measured, ``beyond`` (e.g. the default crossover) bounds it instead."""
    sizes = sorted(set().union(*[set(v) for v in times.values()]))
    inf = float("inf")
    one = two = 0
    for s in sizes:
        t = {a: times.get(a, {}).get(s, inf) for a in ("oneshot", "twoshot", "ring")}
        best = min(t, key=lambda a: (t[a], a != "ring"))
        if best == "oneshot":
            one = s
        if best in ("oneshot", "twoshot"):
            two = s
    if sizes and two == sizes[-1] and beyond is not None:      # not measured where the ring starts to win
        two = max(two, int(beyond))
    return {"oneshot_max_bytes": int(one), "twoshot_max_bytes": int(max(one, two))}


def device_auto_choice(comm, nbytes):
    """choose_device_algorithm for ``comm``, with rank 0's tuning table broadcast once per communicator."""
    state = comm_state(comm)
    picks = state.get("device-auto-picks")
    if picks is None:
        table = load_device_table() if comm.rank == 0 else None
        table = comm.bcast(table, root=0) if comm.size > 1 else table
        picks = state["device-auto-picks"] = {"table": table}
    name = picks.get(nbytes)
    if name is None:
        name = picks[nbytes] = choose_device_algorithm(nbytes, comm.size, picks["table"])
    return name
