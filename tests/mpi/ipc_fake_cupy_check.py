"""MPI worker (CPU): the IPC executors over a fake CuPy and CUDA driver; exits non-zero on failure.

Device memory is files in /dev/shm every rank maps (an IPC handle names the file), streams run each
operation at once and a stream wait spins on the peer's counter: the executors' plumbing on a CPU machine.
"""
import atexit
import ctypes
import inspect
import mmap
import os
import sys
import tempfile
import time
import types

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
os.environ["RINGLAB_IPC_VECTOR"] = "0"        # CuPy elementwise steps (the vector kernel is CUDA C only)
SHM = comm.bcast(tempfile.mkdtemp(prefix="fakecupy-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
                 if comm.rank == 0 else None)


@atexit.register
def _remove_files():                            # ours, also after a failure; rank 0 the folder once it is empty
    for f in [f for f in os.listdir(SHM) if f.startswith(f"r{comm.rank}-")] if os.path.isdir(SHM) else []:
        os.unlink(os.path.join(SHM, f))
    if comm.rank == 0:
        for _ in range(50):
            try:
                os.rmdir(SHM)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


# -- fake device memory ---------------------------------------------------------------------------------------
class Memory:
    allocs = {}          # base -> (size, path, buffer id, mmap)   our allocations
    opened = {}          # address -> mmap                         our mappings of peers' allocations
    next_id = 1

    @classmethod
    def malloc(cls, size):
        path = os.path.join(SHM, f"r{comm.rank}-{cls.next_id}")
        with open(path, "wb") as f:
            f.truncate(max(size, 1))
        with open(path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), max(size, 1))
        base = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        cls.allocs[base] = (size, path, cls.next_id, mm)
        cls.next_id += 1
        return base

    @classmethod
    def find(cls, ptr):
        for base, (size, path, bid, _) in cls.allocs.items():
            if base <= ptr < base + max(size, 1):
                return base, size, path, bid
        raise RuntimeError(f"fake cupy: {ptr:#x} is not in device memory this rank allocated")

    @classmethod
    def free(cls, ptr):
        size, path, _, _ = cls.allocs.pop(ptr)
        os.unlink(path)

    @classmethod
    def handle(cls, base):
        b, _, path, _ = cls.find(base)
        assert b == base, "ipcGetMemHandle of an address that is not an allocation's base"
        return path.encode().ljust(64, b"\0")

    @classmethod
    def open(cls, handle):
        path = handle.rstrip(b"\0").decode()
        with open(path, "r+b") as f:
            mm = mmap.mmap(f.fileno(), 0)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        cls.opened[addr] = mm
        return addr

    @classmethod
    def close(cls, addr):
        cls.opened.pop(addr)


def _u32(addr):
    return ctypes.c_uint32.from_address(addr)


class FakeArray(np.ndarray):
    """A NumPy array in fake device memory: ``.data.ptr`` is its address, ``.get()`` a host copy."""

    def __new__(cls, shape, dtype, memptr):
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = np.ctypeslib.as_array((ctypes.c_char * max(nbytes, 1)).from_address(memptr.ptr))
        return raw.view(np.uint8)[:nbytes].view(dtype).reshape(shape).view(cls)

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self.ctypes.data)

    def get(self):
        return np.array(self)

    def copy(self):
        return asarray(np.array(self))


USER = set()        # allocations of arrays (cupy.empty & co), not of the executors' runtime.malloc


def empty(shape, dtype=np.float32):
    shape = (shape,) if np.isscalar(shape) else tuple(shape)
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    base = Memory.malloc(nbytes + 256)
    USER.add(base)
    return FakeArray(shape, dtype, types.SimpleNamespace(ptr=base + 256))   # at an offset: handles carry it


def asarray(a):
    a = np.asarray(a)
    out = empty(a.shape, a.dtype)
    out[...] = a
    return out


def full_like(a, value):
    out = empty(a.shape, a.dtype)
    out[...] = value
    return out


class Stream:
    current = None
    count = 0

    def __init__(self, non_blocking=False):
        Stream.count += 1
        self.ptr = 0x5000 + Stream.count

    def __enter__(self):
        self.prev, Stream.current = Stream.current, self
        return self

    def __exit__(self, *exc):
        Stream.current = self.prev

    def synchronize(self):
        pass

    def wait_event(self, event):
        pass

    def is_capturing(self):
        return False


class Event:
    done = True

    def __init__(self, disable_timing=False):
        pass

    def record(self, stream=None):
        pass

    def synchronize(self):
        pass


_DEFAULT = Stream()
_PY = {"out = a + b": np.add, "out = a * b": np.multiply, "out = (b > a || b != b) ? b : a": np.maximum,
       "out = (b < a || b != b) ? b : a": np.minimum}


class ElementwiseKernel:
    def __init__(self, params_in, params_out, operation, name):
        self.operation = operation

    def __call__(self, *args):
        if self.operation == "out = (a + b) / n":
            a, b, n, out = args
            out[...] = ((a + b) / n).astype(out.dtype)
        else:
            a, b, out = args
            out[...] = _PY[self.operation](a, b)


_C_TYPES = {"__half": np.float16, "float": np.float32, "double": np.float64, "int": np.int32, "long long": np.int64}
_CODES = {0: np.add, 1: np.multiply, 2: np.maximum, 3: np.minimum, 4: np.add}


def _at(ptr, count, dtype):
    return np.ctypeslib.as_array((ctypes.c_char * max(count * np.dtype(dtype).itemsize, 1)).from_address(int(ptr))
                                 ).view(np.uint8)[: count * np.dtype(dtype).itemsize].view(dtype)


class RawModule:
    """ipc_direct's two kernels, in NumPy, ranks read in order 0..N-1 as the CUDA C does."""

    def __init__(self, code, options=(), name_expressions=()):
        pass

    def get_function(self, name):
        kind, ctype = name[:-1].split("<")
        dtype = _C_TYPES[ctype]

        def reduce_n(grid, block, args):
            srcs, nsrc, out, lo, hi, op, scale = args
            acc = _at(srcs[0], int(hi), dtype)[int(lo):].copy()
            for k in range(1, int(nsrc)):
                acc = _CODES[int(op)](acc, _at(srcs[k], int(hi), dtype)[int(lo):]).astype(dtype)
            out[int(lo):int(hi)] = (acc / scale).astype(dtype) if int(op) == 4 else acc

        def gather(grid, block, args):
            srcs, starts, nchunks, me, out, n = args
            bounds = list(np.asarray(starts)) + [int(n)]
            for c in range(int(nchunks)):
                if c != int(me):
                    out[bounds[c]:bounds[c + 1]] = _at(srcs[c], int(n), dtype)[bounds[c]:bounds[c + 1]]
        return {"rl_reduce_n": reduce_n, "rl_gather": gather}[kind]


def _memcpy(dst, src, nbytes, kind, stream):
    ctypes.memmove(dst, src, nbytes)


def _memset(ptr, value, nbytes):
    ctypes.memset(ptr, value, nbytes)


runtime = types.SimpleNamespace(malloc=Memory.malloc, free=Memory.free, memset=_memset, memcpyAsync=_memcpy,
                                deviceSynchronize=lambda: None, ipcGetMemHandle=Memory.handle,
                                ipcOpenMemHandle=Memory.open, ipcCloseMemHandle=Memory.close)
cuda = types.SimpleNamespace(Stream=Stream, Event=Event, runtime=runtime, get_current_stream=lambda: Stream.current,
                             UnownedMemory=lambda ptr, size, owner, device: types.SimpleNamespace(ptr=ptr, owner=owner),
                             MemoryPointer=lambda mem, offset: types.SimpleNamespace(ptr=mem.ptr + offset),
                             Device=lambda *a: types.SimpleNamespace(id=0, pci_bus_id="fake:00"))
Stream.current = _DEFAULT
fake_cupy = types.ModuleType("cupy")
fake_cupy.__dict__.update(cuda=cuda, ndarray=FakeArray, asarray=asarray, empty=empty, full_like=full_like,
                          ElementwiseKernel=ElementwiseKernel, RawModule=RawModule, uint8=np.uint8)


# -- fake CUDA driver: address queries and stream memory operations -------------------------------------------
def _write_value(stream, addr, value, flags):
    _u32(int(addr)).value = value
    return (0,)


def _wait_value(stream, addr, value, flags):
    deadline = time.monotonic() + 60
    while _u32(int(addr)).value < value:              # GEQ (the counters never wrap here)
        if time.monotonic() > deadline:
            raise RuntimeError(f"fake driver: rank {comm.rank} waited 60 s for {addr:#x} >= {value}")
        os.sched_yield()
    return (0,)


def _address_range(ptr):
    base, size, _, _ = Memory.find(int(ptr))
    return 0, base, size


def _buffer_id(attr, ptr):
    return 0, Memory.find(int(ptr))[3]


driver = types.ModuleType("cuda.bindings.driver")
driver.__dict__.update(CUdeviceptr=int, CUstream=lambda p: p, cuStreamWriteValue32=_write_value,
                       cuStreamWaitValue32=_wait_value, cuMemGetAddressRange=_address_range,
                       cuPointerGetAttribute=_buffer_id,
                       CUstreamWriteValue_flags=types.SimpleNamespace(CU_STREAM_WRITE_VALUE_DEFAULT=0),
                       CUstreamWaitValue_flags=types.SimpleNamespace(CU_STREAM_WAIT_VALUE_GEQ=0),
                       CUpointer_attribute=types.SimpleNamespace(CU_POINTER_ATTRIBUTE_BUFFER_ID=11))
bindings = types.ModuleType("cuda.bindings")
bindings.driver = driver
cuda_pkg = types.ModuleType("cuda")
cuda_pkg.bindings = bindings
sys.modules.update({"cupy": fake_cupy, "cuda": cuda_pkg, "cuda.bindings": bindings, "cuda.bindings.driver": driver})
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# -- the checks -----------------------------------------------------------------------------------------------
import ringlab  # noqa: E402
import ringlab.kernels.codec as codecs  # noqa: E402
from ringlab.gpu import peer_memory  # noqa: E402
from ringlab.gpu.fp8_ipc import get_fp8_ipc_ring  # noqa: E402
from ringlab.gpu.ipc import get_ipc_ring  # noqa: E402
from ringlab.gpu.ipc_direct import get_ipc_direct  # noqa: E402

codecs.DeviceFp8Codec = codecs.HostFp8Codec     # the FP8 ring's arithmetic in NumPy (same bytes as the host ring)
n, rank = comm.size, comm.rank
REF = {"sum": np.sum, "prod": np.prod, "max": np.max, "min": np.min}
executors = {"ipc": lambda: get_ipc_ring(comm), "ipc:3": lambda: get_ipc_ring(comm, 3, "stream"),
             "ipc-host": lambda: get_ipc_ring(comm, 1, "host"), "ipc-shared": lambda: get_ipc_ring(comm, 1, "shared"),
             "oneshot": lambda: get_ipc_direct(comm, "oneshot"), "twoshot": lambda: get_ipc_direct(comm, "twoshot")}
cases = 0
for name, make in executors.items():
    for count in (0, 1, n + 1, 1009):
        for dtype in ("int64", "float32"):
            inputs = [(np.arange(count) * (k + 3) % 11 - 5).astype(dtype) for k in range(n)]
            for op in ("sum", "prod", "max", "min", "avg"):
                if op == "avg" and dtype == "int64":
                    continue
                want = np.mean(inputs, axis=0) if op == "avg" else REF[op](np.stack(inputs), axis=0)
                for inplace in (False, True):
                    for rep in range(2):                      # the same buffers again: counters carry over
                        src = asarray(inputs[rank])
                        out = src if inplace else full_like(src, 99)
                        assert make().allreduce(src, out, op, timeout=30) is True
                        tol = 1e-6 * np.abs(want).max(initial=1) if op == "avg" else 0
                        if not np.allclose(out.get(), want, rtol=0, atol=tol):
                            raise AssertionError(f"rank {rank} {name} {dtype} {op} count={count} inplace={inplace}")
                        cases += 1
# api.py's call today, through the transition shim (algo per call) while it exists
DIRECT_SHIM = inspect.signature(get_ipc_direct).parameters["algo"].default is None
FP8_SHIM = inspect.signature(get_fp8_ipc_ring).parameters["fmt"].default is None
src = asarray(np.arange(10, dtype=np.float32) + rank)
out = full_like(src, 0)
for algo in ("oneshot", "twoshot") if DIRECT_SHIM else ():
    get_ipc_direct(comm).allreduce(src, out, "sum", algo=algo, timeout=30)
    assert np.array_equal(out.get(), np.arange(10) * n + n * (n - 1) / 2), algo
assert get_ipc_direct(comm, "oneshot") is get_ipc_direct(comm, "oneshot")

# FP8 over the fake IPC equals the host FP8 ring bit for bit; the slots grow with the size (reallocated)
for count in (7, 5000, 300, 20000):
    x = np.random.default_rng([rank, count]).standard_normal(count).astype(np.float32)
    for fmt, block in (("e4m3", 128), ("e5m2", 32)):
        host = ringlab.allreduce_fp8(x, algo="fp8-ring", fmt=fmt, block=block, comm=comm)
        got = full_like(asarray(x), 0)
        assert get_fp8_ipc_ring(comm, fmt, block).allreduce(asarray(x), got, "sum", timeout=30) is True
        assert np.array_equal(got.get(), host), (fmt, block, count)
        if FP8_SHIM:                                                      # fp8.py's call today
            shim = full_like(asarray(x), 0)
            get_fp8_ipc_ring(comm).allreduce(asarray(x), shim, codecs.HostFp8Codec(fmt, block), "sum", 30)
            assert np.array_equal(shim.get(), host), ("shim", fmt, block, count)
        cases += 1

# leak accounting: the same buffers again hold no new mappings; closing every executor unmaps and frees all
src, out = asarray(np.ones(100, np.float32)), full_like(asarray(np.ones(100, np.float32)), 0)
for name, make in executors.items():
    make().allreduce(src, out, "sum", timeout=30)
before = peer_memory.open_ipc_handles()
for name, make in executors.items():
    for _ in range(3):
        make().allreduce(src, out, "sum", timeout=30)
assert peer_memory.open_ipc_handles() == before, (before, peer_memory.open_ipc_handles())
assert len(Memory.opened) == before, (len(Memory.opened), before)     # the count is exactly what is mapped
comm.Barrier()
assert n == 1 or set(Memory.allocs) - USER, "the executors hold device counters"
peer_memory.close_all()
comm.Barrier()
assert not Memory.opened, f"rank {rank}: {len(Memory.opened)} mappings left open"
assert not set(Memory.allocs) - USER, f"rank {rank}: executor memory not freed at close"
assert peer_memory.open_ipc_handles() == 0
comm.Barrier()
if rank == 0:
    print(f"ipc_fake_cupy_check OK: N={n} cases={cases}", flush=True)
