"""What the persistent-kernel executors (device_ring, device_fp8, device_small) share: the host's status check,
synchronize, the table upload cache, the co-residency probe, and DriverLaunch (one cuLaunchKernel per call).

No base class (the executors are siblings composed from PeerMemory, docs/architecture.md): an executor binds
``check``, ``synchronize`` and ``cached`` as its own methods (``check = persistent.check``) and provides what they
read: ``comm``, ``n``, ``rank``, ``timeout``, ``fallback``, ``status`` / ``trace`` (host-mapped words),
``STATUS_OK`` (its kernel's), ``_label`` (names the kernel in a timeout), ``_stalled_at()`` (where it gave up,
from the status words), ``_table_label`` (names the executor when an upload is refused) and ``_keep``.
"""
import ctypes
import os

from mpi4py import MPI

from ringlab.errors import CollectiveTimeout
from ringlab.faults import handle_timeout
from ringlab.gpu.peer_memory import same_gpu_ranks

__all__ = ["check", "synchronize", "cached", "probe", "mps_visible", "DriverLaunch", "PROBE_LIMIT_NS", "THREADS",
           "CACHE_ENTRIES"]

THREADS = 768                    # a launcher's threads per block until its executor sets them (device_ring.THREADS)
PROBE_LIMIT_NS = 2_000_000       # co-resident ring of <= 64 ranks: tens of us; time-sliced: milliseconds
CACHE_ENTRIES = 64               # uploaded tables kept per cache before it is dropped (to _keep) and refilled


def mps_visible():
    """True when an MPS control daemon's pipe is visible to this process (for reports; the probe decides)."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
    return os.path.exists(os.path.join(pipe, "control"))


# -- methods an executor binds as its own -------------------------------------------------------------

def check(self):
    """Raise CollectiveTimeout if an earlier call's kernel gave up waiting for a peer (no host sync)."""
    if self.fallback is None and int(self.status[0]) != self.STATUS_OK:
        peer = int(self.status[1])
        exc = CollectiveTimeout(f"rank {self.rank}: {self._label} kernel gave up after {self.timeout} s waiting "
                                f"for rank {peer} ({self._stalled_at()}); the communicator is unusable now",
                                peer=peer, rank=self.rank)
        handle_timeout(exc)
        raise exc


def synchronize(self):
    """Wait for the caller's stream, then raise any recorded timeout."""
    import cupy
    cupy.cuda.get_current_stream().synchronize()
    self.check()


def cached(self, cache, key, host_table, stream=None):
    """``cache[key] = host_table`` uploaded (cupy.asarray); refused while ``stream`` (default: the current one)
    captures a graph. Beyond CACHE_ENTRIES the cache is emptied into ``_keep`` (a queued kernel may still read
    its tables: the last two generations are freed later)."""
    import cupy
    stream = cupy.cuda.get_current_stream() if stream is None else stream
    if stream.is_capturing():
        raise RuntimeError(f"{self._table_label}: the first call with these buffers (or this size) cannot be "
                           "captured in a CUDA graph (it uploads a table); run it once before capturing")
    if len(cache) > CACHE_ENTRIES:
        self._keep.append(list(cache.values()))
        self._keep = self._keep[-2:]
        cache.clear()
    cache[key] = cupy.asarray(host_table)
    return cache[key]


# -- the co-residency probe -------------------------------------------------------------------------

def probe(ex, fallback, launch, result_ok, last, reset, load_kernel=None, agree_ok=False):
    """(mode, why, ok): does a traced call finish fast once every rank has started? Collective.

    ``load_kernel()`` runs before the first barrier (ranks then start together); ``launch()`` enqueues one traced call
    (twice: the first pays module loading); ``result_ok()`` checks its output once the status word is OK; ``last``:
    the trace word of the kernel's end (word 0: its start). ``launch`` None: no trial call (span 0). Not fast on
    every rank: the status words and each ``(device pointer, bytes)`` of ``reset`` are zeroed and ``fallback`` is the
    mode. ``ok``: this rank's trial finished with the right result (with ``agree_ok``: on every rank)."""
    import cupy
    ok, span = True, 0
    if launch is not None:
        if load_kernel is not None:
            load_kernel()
        for _ in range(2):
            ex.comm.Barrier()
            launch()
            cupy.cuda.get_current_stream().synchronize()
            ok = int(ex.status[0]) == ex.STATUS_OK and bool(result_ok())
            if not ok:
                break
        starts = ex.comm.allgather((int(ex.trace[0]), int(ex.trace[last])))
        mine = same_gpu_ranks(ex.comm)
        if ok:
            span = max(starts[k][1] for k in mine) - max(starts[k][0] for k in mine)
    fast = ex.comm.allreduce(int(ok and span < PROBE_LIMIT_NS), op=MPI.MIN)
    if agree_ok:
        ok = bool(ex.comm.allreduce(int(ok), op=MPI.MIN))
    if fast:
        return "per-rank", f"kernels co-run (probe: {span / 1e3:.0f} us after the last start)", ok
    ex.status[:] = 0                                    # reset every counter before the fallback takes over
    for ptr, nbytes in reset:
        cupy.cuda.runtime.memset(ptr, 0, nbytes)
    cupy.cuda.runtime.deviceSynchronize()
    ex.comm.Barrier()
    why = "no co-residency: MPS not running?" if ok else "probe timed out"
    return fallback, f"{why} (probe span {span / 1e3:.0f} us, MPS pipe visible: {mps_visible()})", ok


# -- one cuLaunchKernel per call ---------------------------------------------------------------------

class DriverLaunch:
    """cuLaunchKernel of a compiled numba kernel whose parameters are five 64-bit integers, packed in place
    (numba's own launch path costs far more host time than the kernel's latency)."""

    def __init__(self, function):
        from cuda.bindings import driver
        self.d, self.function, self.streams = driver, function, {}
        self.threads, self.max_parts = THREADS, 1
        self.values = (ctypes.c_uint64 * 5)()
        self.pointers = (ctypes.c_void_p * 5)(*[ctypes.addressof(self.values) + 8 * k for k in range(5)])
        self.params = ctypes.addressof(self.pointers)

    @classmethod
    def for_kernel(cls, kern):
        from cuda.bindings import driver
        overload = next(iter(kern.overloads.values()))
        handle = overload._codelibrary.get_cufunc().handle       # a CUkernel (library-managed module)
        if isinstance(handle, driver.CUkernel):
            err, handle = driver.cuKernelGetFunction(handle)
            if int(err) != 0:
                raise RuntimeError(f"cuKernelGetFunction failed: CUresult {int(err)}")
        return cls(handle)

    def attribute(self, name):
        """cuFuncGetAttribute(CU_FUNC_ATTRIBUTE_<name>) of the kernel, e.g. MAX_THREADS_PER_BLOCK, NUM_REGS."""
        a = getattr(self.d.CUfunction_attribute, f"CU_FUNC_ATTRIBUTE_{name}")
        err, value = self.d.cuFuncGetAttribute(a, self.function)
        if int(err) != 0:
            raise RuntimeError(f"cuFuncGetAttribute({name}) failed: CUresult {int(err)}")
        return int(value)

    def blocks_per_sm(self, threads):
        err, value = self.d.cuOccupancyMaxActiveBlocksPerMultiprocessor(self.function, threads, 0)
        if int(err) != 0:
            raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed: CUresult {int(err)}")
        return int(value)

    def __call__(self, parts, threads, stream_ptr, *args):
        stream = self.streams.get(stream_ptr)
        if stream is None:
            if len(self.streams) > 64:
                self.streams.clear()
            stream = self.streams[stream_ptr] = self.d.CUstream(stream_ptr)
        for k, v in enumerate(args):
            self.values[k] = v & 0xFFFFFFFFFFFFFFFF
        err, = self.d.cuLaunchKernel(self.function, parts, 1, 1, threads, 1, 1, 0, stream, self.params, 0)
        if int(err) != 0:
            raise RuntimeError(f"cuLaunchKernel of the device ring failed: CUresult {int(err)}")
