"""numba-CUDA plumbing shared by the kernels: the import, bit casts, launch sizes, array adapters."""
# numba has no scalar bit cast, so fp32 <-> int32 goes through libdevice (``__nv_float_as_int``)
# on the GPU and through NumPy views in the CUDA simulator, where libdevice is only stubs.
# ``fmul_rn`` is a multiply the compiler may not fuse into an FMA: NVVM contracts mul+add by default,
# and a fused ``local + decoded * scale`` would round once instead of twice and stop matching NumPy.

import ctypes
import os
import threading

import numpy as np

from ringlab import settings
from ringlab.kernels import patch_numpy_for_numba

patch_numpy_for_numba()
# Small launches are normal here (a ring's chunks, tails): numba's per-launch occupancy warning is noise.
_QUIET_OCCUPANCY = "NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS" not in os.environ

from numba import config, cuda  # noqa: E402

try:                                   # numba-cuda keeps its own config module; numba's is the fallback
    from numba.cuda.core import config as _cuda_config
except ImportError:  # pragma: no cover - older numba
    _cuda_config = config
if _QUIET_OCCUPANCY:            # also when numba was imported before us (the environment is read then)
    _cuda_config.CUDA_LOW_OCCUPANCY_WARNINGS = 0

__all__ = ["cuda", "SIMULATED", "f32_bits", "bits_f32", "fmul_rn", "device_fn", "launch_blocks",
           "launch", "kernel_view", "data_address", "sm_count", "hardware_fp8", "TPB", "ITEMS"]

SIMULATED = bool(config.ENABLE_CUDASIM)
TPB = 256          # threads per CUDA block
ITEMS = 4          # elements per thread per grid-stride iteration (independent loads in flight)
_MAX_BLOCKS = 8192


def device_fn(pyfunc):
    """Compile a Python function as a CUDA device function (a plain callable in the simulator)."""
    return cuda.jit(device=True)(pyfunc)


if SIMULATED:
    def f32_bits(x):
        return int(np.float32(x).view(np.uint32))

    def bits_f32(b):
        return np.uint32(b).view(np.float32)

    def fmul_rn(a, b):
        return np.float32(a) * np.float32(b)
else:
    from numba.cuda import libdevice

    @cuda.jit(device=True)
    def f32_bits(x):
        return libdevice.float_as_int(np.float32(x)) & 0xFFFFFFFF

    @cuda.jit(device=True)
    def bits_f32(b):
        return libdevice.int_as_float(np.int32(b))    # int64 -> int32 truncates: the low 32 bits

    @cuda.jit(device=True)
    def fmul_rn(a, b):
        return libdevice.fmul_rn(np.float32(a), np.float32(b))


_streams = {}
_launch_lock = threading.Lock()


def _current_stream():
    """numba's handle for CuPy's current stream (0, the legacy default stream, without CuPy)."""
    try:
        import cupy
    except ImportError:
        return 0
    ptr = cupy.cuda.get_current_stream().ptr
    if not ptr:
        return 0
    if ptr not in _streams:
        if len(_streams) > 64:
            _streams.clear()
        _streams[ptr] = cuda.external_stream(ptr)
    return _streams[ptr]


def launch(kern, grid, tpb, *args):
    """``kern[grid, tpb](*args)`` on CuPy's current stream, the stream the arrays were produced on.

    numba synchronizes the stream named in every CuPy argument's ``__cuda_array_interface__`` before
    a launch (NUMBA_CUDA_ARRAY_INTERFACE_SYNC, on by default): with ten array arguments that is ten
    host waits per launch, the GPU idles while Python dispatches, and back-to-back launches cannot
    queue up. Launching on the producers' stream gives the same ordering without any host wait, so
    that sync is switched off for our launches only (under a lock; restored afterwards). Repeated
    launches with the same argument types skip numba's per-call typing and, for CuPy arrays, its
    per-argument device-array wrapping (``_fast_launch``, ``_LeanLauncher``).
    """
    if SIMULATED:
        return kern[grid, tpb](*args)
    stream = _current_stream()
    with _launch_lock:
        saved = _cuda_config.CUDA_ARRAY_INTERFACE_SYNC
        _cuda_config.CUDA_ARRAY_INTERFACE_SYNC = False
        try:
            if not _fast_launch(kern, grid, tpb, stream, args):
                kern[grid, tpb, stream](*args)
        finally:
            _cuda_config.CUDA_ARRAY_INTERFACE_SYNC = saved


_overloads = {}
_FAST = settings.get("RINGLAB_NUMBA_FAST_LAUNCH")
_LEAN = _FAST                # the lean parameter packer on top of the cached overload (_LeanLauncher)


def _type_key(a):
    """What numba's typing of ``a`` depends on, cheaply: dtype, ndim and contiguity, or the scalar type."""
    dt = getattr(a, "dtype", None)
    if dt is not None and hasattr(a, "shape"):
        return (dt.str, len(a.shape), bool(a.flags.c_contiguous))
    return (type(a), dt.str if dt is not None else None)


def _fast_launch(kern, grid, tpb, stream, args):
    """Launch the compiled overload numba picked for the same argument types last time, without the
    dispatcher's typing (numba's per-argument typeof is most of a launch's host cost). False when
    the caller should use the normal dispatcher: the first launch of a type combination is made
    here through it, and any numba without these internals turns the fast path off."""
    if not _FAST:
        return False
    key = (id(kern), tuple(_type_key(a) for a in args))
    compiled = _overloads.get(key)
    if compiled is False:
        return False
    if compiled is None:
        kern[grid, tpb, stream](*args)
        try:
            from numba.cuda.cudadrv.driver import _to_core_stream
            from numba.cuda.errors import normalize_kernel_dimensions
            sig = tuple(kern.typeof_pyval(a) for a in args)
            _overloads[key] = [kern.overloads[sig], _to_core_stream, normalize_kernel_dimensions, None]
        except (AttributeError, ImportError, KeyError, TypeError):   # another numba: use the dispatcher
            _overloads[key] = False
        return True
    overload, to_core_stream, normalize, lean = compiled
    g, b = normalize(grid, tpb)
    core_stream = to_core_stream(stream)
    if lean is None:                                 # second launch: check the packer against numba once
        lean = compiled[3] = _LEAN and _LeanLauncher.checked(overload, core_stream, args)
    try:
        if lean:
            lean.launch(core_stream, g, b, args)
        else:
            overload.launch(args, g, b, core_stream, 0)
    except TypeError:             # an internal signature changed: nothing was launched, fall back for good
        _overloads[key] = False
        return False
    return True


class _LeanLauncher:
    """Kernel parameters packed straight from CuPy arrays, the launch made as numba makes it.

    numba turns every array argument into a numba device array (from its ``__cuda_array_interface__``)
    just to read its size, item size and pointer: most of the host time a launch of the FP8 kernels
    costs (docs/fp8.md), paid once per ring step. A 1-D C-contiguous array is 7 kernel parameters (meminfo,
    parent, size, itemsize, data, shape, stride); ``checked`` builds them once both ways and keeps this
    path only if they agree with numba's own ``_prepare_args``.
    """

    def __init__(self, overload, packers):
        from numba.cuda import dispatcher
        self.kernel = overload._codelibrary.get_cufunc().kernel
        self.packers, self.configs, self._d = packers, {}, dispatcher

    @staticmethod
    def _packers(overload):
        from numba.cuda import types as nt
        packers = []
        for ty in overload.argument_types:
            if isinstance(ty, nt.Array) and ty.ndim == 1 and ty.layout == "C":
                packers.append(None)
            elif isinstance(ty, nt.Integer):
                packers.append(getattr(ctypes, f"c_{ty}"))
            elif ty in (nt.float32, nt.float64):
                packers.append(ctypes.c_float if ty == nt.float32 else ctypes.c_double)
            elif ty == nt.boolean:
                packers.append(lambda v: v)          # as numba passes it
            else:
                return None
        return packers

    def params(self, args):
        out = []
        for pack, a in zip(self.packers, args):
            if pack is None:
                n, size = a.size, a.itemsize
                out += (0, 0, n, size, a.data.ptr if n else 0, n, size)
            else:
                out.append(pack(a))
        return out

    def launch(self, core_stream, g, b, args):
        config = self.configs.get((g, b))
        if config is None:
            if len(self.configs) > 256:              # one per grid size seen: keep it bounded
                self.configs.clear()
            kw = {"is_cooperative" if self._d.CUDA_CORE_GE_1_0 else "cooperative_launch": False}
            config = self.configs[(g, b)] = self._d.LaunchConfig(grid=g, block=b, shmem_size=0, **kw)
        self._d.launch(core_stream, config, self.kernel, *self.params(args))

    @classmethod
    def checked(cls, overload, core_stream, args):
        """A launcher whose parameters equal numba's for ``args``, else False (use numba's launch)."""
        try:
            packers = cls._packers(overload)
            if packers is None or not all(hasattr(a, "data") and hasattr(a.data, "ptr")
                                          for p, a in zip(packers, args) if p is None):
                return False
            lean = cls(overload, packers)
            theirs = []
            for ty, a in zip(overload.argument_types, args):
                overload._prepare_args(ty, a, core_stream, [], theirs)
            value = lambda v: v.value if hasattr(v, "value") else v  # noqa: E731
            mine, theirs = [value(v) for v in lean.params(args)], [value(v) for v in theirs]
            empty_ptrs = set()                       # an empty array's pointer is never read
            i = 0
            for p, a in zip(packers, args):
                if p is None and a.size == 0:
                    empty_ptrs.add(i + 4)
                i += 7 if p is None else 1
            same = len(mine) == len(theirs) and all(m == t for k, (m, t) in enumerate(zip(mine, theirs))
                                                    if k not in empty_ptrs)
            return lean if same else False
        except Exception:  # noqa: BLE001 - any surprise in numba's internals: keep numba's own launch
            return False


def hardware_fp8():
    """True when the GPU converts fp32 -> FP8 in hardware (PTX cvt ... e4m3x2/e5m2x2: sm_89 and newer)
    and RINGLAB_FP8_HW is not 0. The simulator never does."""
    if SIMULATED or not settings.get("RINGLAB_FP8_HW"):
        return False
    if not _hw:
        _hw.append(tuple(cuda.get_current_device().compute_capability) >= (8, 9))
    return _hw[0]


_hw = []


def data_address(a):
    """Device (CuPy, numba) or host (NumPy, in the simulator) address of a's first element."""
    ptr = getattr(getattr(a, "data", None), "ptr", None)      # CuPy, without building its interface dict
    if ptr is not None:
        return ptr
    iface = getattr(a, "__cuda_array_interface__", None) or a.__array_interface__
    return iface["data"][0]


_sm_count = []


def sm_count():
    """Streaming multiprocessors of the current device (1 in the simulator)."""
    if not _sm_count:
        _sm_count.append(1 if SIMULATED else int(cuda.get_current_device().MULTIPROCESSOR_COUNT))
    return _sm_count[0]


def launch_blocks(n, per_block=TPB * ITEMS):
    """CUDA blocks for ``n`` elements: enough to cover them once, capped (grid-stride loops do the rest)."""
    return max(1, min(_MAX_BLOCKS, -(-n // per_block)))


def kernel_view(a):
    """(array the kernel sees, kind): kind is 'f32', 'f16', 'f64', 'bf16' (passed as uint16 bits), 'i32', 'i64'.

    Accepts CuPy arrays, numba device arrays and (in the simulator) NumPy arrays, flat.
    """
    name = np.dtype(a.dtype).name if str(a.dtype) != "bfloat16" else "bfloat16"
    if name == "bfloat16":
        return a.view(np.uint16), "bf16"
    kinds = {"float32": "f32", "float16": "f16", "float64": "f64", "int32": "i32", "int64": "i64",
             "uint16": "bf16"}
    if name not in kinds:
        raise TypeError(f"no kernel for dtype {name}")
    return a, kinds[name]
