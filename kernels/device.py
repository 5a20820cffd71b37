"""numba-CUDA plumbing shared by the kernels: the import, bit casts, launch sizes, array adapters.

numba has no scalar bit cast, so fp32 <-> int32 goes through libdevice (``__nv_float_as_int``)
on the GPU and through NumPy views in the CUDA simulator, where libdevice is only stubs.
``fmul_rn`` is a multiply the compiler may not fuse into an FMA: NVVM contracts mul+add by default,
and a fused ``local + decoded * scale`` would round once instead of twice and stop matching NumPy.
"""
import os
import threading

import numpy as np

from . import patch_numpy_for_numba

patch_numpy_for_numba()

from numba import config, cuda  # noqa: E402

try:                                   # numba-cuda keeps its own config module; numba's is the fallback
    from numba.cuda.core import config as _cuda_config
except ImportError:  # pragma: no cover - older numba
    _cuda_config = config

__all__ = ["cuda", "SIMULATED", "f32_bits", "bits_f32", "fmul_rn", "shfl_xor_max", "device_fn", "launch_blocks",
           "launch", "kernel_view", "data_address", "sm_count", "hardware_fp8", "fp8x2_converter", "fp8x2_decoder", "TPB", "ITEMS"]

SIMULATED = bool(config.ENABLE_CUDASIM)
TPB = 256          # threads per CUDA block
ITEMS = 4          # elements per thread per grid-stride iteration (independent loads in flight)
_MAX_BLOCKS = 8192


def device_fn(pyfunc):
    """Compile a Python function as a CUDA device function (a plain callable in the simulator)."""
    return cuda.jit(device=True)(pyfunc)


if SIMULATED:
    def _shfl_xor_max(v, offset):
        # The simulator has no warp shuffles: exchange through shared memory. Every thread of the CUDA
        # block must call this equally often (the FP8 kernels' loops are block-uniform for this reason).
        sh = cuda.shared.array(1024, np.float32)
        t = cuda.threadIdx.x
        cuda.syncthreads()
        sh[t] = v
        cuda.syncthreads()
        other = sh[t ^ offset]
        return other if other > v else v
    shfl_xor_max = cuda.jit(device=True)(_shfl_xor_max)

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

    @cuda.jit(device=True)
    def shfl_xor_max(v, offset):
        """max(v, v of lane ^ offset) over the full warp (values are finite and >= 0)."""
        other = cuda.shfl_xor_sync(0xFFFFFFFF, v, offset)
        return other if other > v else v


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
    launches with the same argument types skip numba's per-call typing (``_fast_launch``).
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
_FAST = os.environ.get("RINGLAB_NUMBA_FAST_LAUNCH", "1") != "0"


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
            _overloads[key] = (kern.overloads[sig], _to_core_stream, normalize_kernel_dimensions)
        except (AttributeError, ImportError, KeyError, TypeError):   # another numba: use the dispatcher
            _overloads[key] = False
        return True
    overload, to_core_stream, normalize = compiled
    g, b = normalize(grid, tpb)
    try:
        overload.launch(args, g, b, to_core_stream(stream), 0)
    except TypeError:             # an internal signature changed: nothing was launched, fall back for good
        _overloads[key] = False
        return False
    return True


def hardware_fp8():
    """True when the GPU converts fp32 -> FP8 in hardware (PTX cvt ... e4m3x2/e5m2x2: sm_89 and newer)
    and RINGLAB_FP8_HW is not 0. The simulator never does."""
    if SIMULATED or os.environ.get("RINGLAB_FP8_HW", "1") == "0":
        return False
    if not _hw:
        _hw.append(tuple(cuda.get_current_device().compute_capability) >= (8, 9))
    return _hw[0]


_hw = []


_cvt = {}


def fp8x2_converter(fmt_name):
    """Device function ``cvt(lo, hi) -> uint16``: two fp32 values rounded to nearest even into FP8
    codes (``lo`` in the low byte), saturating finite values at +-fmax, in one PTX instruction
    (``cvt.rn.satfinite.e4m3x2.f32``). Inputs must be finite: NaN/inf follow the project's policy
    in the caller. Same bits as the software encoder (the device check compares both to ml_dtypes)."""
    if fmt_name not in _cvt:
        from llvmlite import ir
        from numba import types
        from numba.cuda.extending import intrinsic
        ptx = f"cvt.rn.satfinite.{fmt_name}x2.f32 $0, $1, $2;"     # $1 -> high byte, $2 -> low byte

        @intrinsic
        def cvt_x2(typingctx, hi, lo):
            def codegen(context, builder, sig, args):
                fnty = ir.FunctionType(ir.IntType(16), [ir.FloatType(), ir.FloatType()])
                return builder.call(ir.InlineAsm(fnty, ptx, "=h,f,f"), args)
            return types.uint16(types.float32, types.float32), codegen

        def cvt(lo, hi):
            return cvt_x2(np.float32(hi), np.float32(lo))
        _cvt[fmt_name] = device_fn(cvt)
    return _cvt[fmt_name]


_dec = {}


def fp8x2_decoder(fmt_name):
    """Device function ``dec(lo, hi) -> (fp32, fp32)``: two FP8 codes to their exact values through
    the GPU's FP8 -> f16x2 conversion (``cvt.rn.f16x2.e4m3x2``) and f16 -> f32 (both exact). NaN codes
    give a NaN of unspecified sign and payload (the policy's NaN handling does not look at either)."""
    if fmt_name not in _dec:
        from llvmlite import ir
        from numba import types
        from numba.cuda.extending import intrinsic
        ptx = ("{ .reg .b32 h2; .reg .b16 lo, hi;\n"
               f" cvt.rn.f16x2.{fmt_name}x2 h2, $2;\n"
               " mov.b32 {lo, hi}, h2;\n cvt.f32.f16 $0, lo;\n cvt.f32.f16 $1, hi; }")

        @intrinsic
        def dec_x2(typingctx, word):
            ret = types.UniTuple(types.float32, 2)

            def codegen(context, builder, sig, args):
                f32 = ir.FloatType()
                fnty = ir.FunctionType(ir.LiteralStructType([f32, f32]), [ir.IntType(16)])
                pair = builder.call(ir.InlineAsm(fnty, ptx, "=f,=f,h"), [args[0]])
                return context.make_tuple(builder, ret, [builder.extract_value(pair, 0),
                                                         builder.extract_value(pair, 1)])
            return ret(types.uint16), codegen

        def dec(lo, hi):
            return dec_x2(np.uint16((hi << 8) | lo))
        _dec[fmt_name] = device_fn(dec)
    return _dec[fmt_name]


def data_address(a):
    """Device (CuPy, numba) or host (NumPy, in the simulator) address of a's first element."""
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
