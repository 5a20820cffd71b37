"""numba-CUDA plumbing shared by the kernels: the import, bit casts, launch sizes, array adapters.

numba has no scalar bit cast, so fp32 <-> int32 goes through libdevice (``__nv_float_as_int``)
on the GPU and through NumPy views in the CUDA simulator, where libdevice is only stubs.
``fmul_rn`` is a multiply the compiler may not fuse into an FMA: NVVM contracts mul+add by default,
and a fused ``local + decoded * scale`` would round once instead of twice and stop matching NumPy.
"""
import numpy as np

from . import patch_numpy_for_numba

patch_numpy_for_numba()

from numba import config, cuda  # noqa: E402

__all__ = ["cuda", "SIMULATED", "f32_bits", "bits_f32", "fmul_rn", "shfl_xor_max", "device_fn", "launch_blocks",
           "kernel_view", "data_address", "sm_count", "TPB", "ITEMS"]

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
        s = b - 0x100000000 if b >= 0x80000000 else b
        return libdevice.int_as_float(np.int32(s))

    @cuda.jit(device=True)
    def fmul_rn(a, b):
        return libdevice.fmul_rn(np.float32(a), np.float32(b))

    @cuda.jit(device=True)
    def shfl_xor_max(v, offset):
        """max(v, v of lane ^ offset) over the full warp (values are finite and >= 0)."""
        other = cuda.shfl_xor_sync(0xFFFFFFFF, v, offset)
        return other if other > v else v


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
