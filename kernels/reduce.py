"""Elementwise reduce kernels, dst = a (op) b, for sum/prod/max/min in fp32, fp16, bf16, fp64, int32, int64.

Grid-stride loops, ``ITEMS`` independent elements per thread per iteration. bfloat16 has no numba
type: its uint16 bit patterns are widened to fp32 (bits << 16), combined in fp32 and rounded back
to nearest even, which is correctly rounded for +, * (24 >= 2*8 + 2 bits) and matches ml_dtypes.
When the buffers allow it, bf16 runs on packed uint32 words, two elements per 4-byte access.
max/min propagate NaN like NumPy's maximum/minimum. Integers wrap like NumPy.
"""
import numpy as np

from .device import ITEMS, TPB, bits_f32, cuda, device_fn, f32_bits, kernel_view, launch, launch_blocks
from .fp8_bits import bf16_bits_from_f32_bits

__all__ = ["reduce_device", "REDUCE_OPS", "REDUCE_KINDS"]

REDUCE_OPS = ("sum", "prod", "max", "min")
REDUCE_KINDS = ("f32", "f16", "bf16", "f64", "i32", "i64")
_kernels = {}


def _sum(a, b):
    return a + b


def _prod(a, b):
    return a * b


def _max(a, b):
    return a if (a > b or a != a) else b     # NaN in either operand wins (a != a is a NaN test)


def _min(a, b):
    return a if (a < b or a != a) else b


_COMBINE = {"sum": _sum, "prod": _prod, "max": _max, "min": _min}
_bf16_round = device_fn(bf16_bits_from_f32_bits)


def _make_bf16_combine(combine):
    def bf16_combine(x, y):
        # int64 first: in the simulator a NumPy uint16 would shift its bits out.
        r = combine(bits_f32(np.int64(x) << 16), bits_f32(np.int64(y) << 16))
        return _bf16_round(f32_bits(r))
    return device_fn(bf16_combine)


def _make_kernel(op, kind, packed):
    combine = device_fn(_COMBINE[op])
    if kind == "bf16":
        combine = _make_bf16_combine(combine)
    if packed:                       # bf16 pairs in uint32 words: low half is the element at the lower address
        pair = combine

        def combine_word(x, y):
            x, y = np.int64(x), np.int64(y)
            lo = pair(x & 0xFFFF, y & 0xFFFF)
            hi = pair((x >> 16) & 0xFFFF, (y >> 16) & 0xFFFF)
            return (hi << 16) | lo
        combine = device_fn(combine_word)
    items = ITEMS

    def reduce_kernel(dst, a, b, n):
        stride = cuda.gridDim.x * cuda.blockDim.x
        i0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i0 < n:
            for k in range(items):
                i = i0 + k * stride
                if i < n:
                    dst[i] = combine(a[i], b[i])
            i0 += items * stride
    return cuda.jit(reduce_kernel)


def _kernel(op, kind, packed):
    key = (op, kind, packed)
    if key not in _kernels:
        _kernels[key] = _make_kernel(op, kind, packed)
    return _kernels[key]


def _word_aligned(*arrays):
    for a in arrays:
        ptr = a.__cuda_array_interface__["data"][0] if hasattr(a, "__cuda_array_interface__") else a.ctypes.data
        if ptr % 4:
            return False
    return True


def reduce_device(a, b, op="sum", out=None):
    """``out = a (op) b`` on the GPU (or the simulator); ``out=a`` reduces in place. Returns ``out``.

    Arrays: flat, contiguous, same dtype and size (CuPy, numba device arrays; NumPy in the simulator).
    """
    if op not in REDUCE_OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(REDUCE_OPS)}")
    if out is None:   # numba device arrays have no .copy(); CuPy and NumPy (simulator) arrays do
        out = cuda.device_array_like(a) if hasattr(a, "copy_to_host") else a.copy()
    if a.dtype != b.dtype or a.dtype != out.dtype:
        raise TypeError(f"dtypes differ: a {a.dtype}, b {b.dtype}, out {out.dtype}")
    if not (a.size == b.size == out.size):
        raise ValueError(f"sizes differ: a {a.size}, b {b.size}, out {out.size}")
    (av, kind), (bv, _), (ov, _) = kernel_view(a.reshape(-1)), kernel_view(b.reshape(-1)), kernel_view(out.reshape(-1))
    n = av.size
    if n == 0:
        return out
    packed = kind == "bf16" and n % 2 == 0 and _word_aligned(av, bv, ov)
    if packed:
        av, bv, ov, n = av.view(np.uint32), bv.view(np.uint32), ov.view(np.uint32), n // 2
    launch(_kernel(op, kind, packed), launch_blocks(n), TPB, ov, av, bv, n)
    return out
