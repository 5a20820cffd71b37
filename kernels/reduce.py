"""Elementwise reduce kernels, dst = a (op) b, for sum/prod/max/min in fp32, fp16, bf16, fp64, int32, int64."""
# Grid-stride loops over quads (four consecutive elements), ``ITEMS`` quads per thread per round, all
# loads of a round issued before its first store; aligned buffers move a quad in one vector access
# (``intrinsics.load4``: 16 bytes of fp32), others element by element; the last n % 4 elements go one
# per thread. bfloat16 has no numba type: its uint16 bit patterns are widened to fp32 (bits << 16),
# combined in fp32 and rounded back to nearest even, which is correctly rounded for +, * (24 >= 2*8 + 2
# bits) and matches ml_dtypes. max/min propagate NaN like NumPy's maximum/minimum. Integers wrap like NumPy.

import numpy as np

from ringlab.kernels.device import ITEMS, TPB, bits_f32, cuda, device_fn, kernel_view, launch, launch_blocks
from ringlab.kernels.optable import OPS
from ringlab.kernels.intrinsics import aligned4, bf16_rounder, load4, scalar_load4, scalar_store4, store4

__all__ = ["reduce_device", "REDUCE_OPS", "REDUCE_KINDS"]

REDUCE_OPS = tuple(op for op in OPS if op != "avg")      # avg is sum here; the caller divides
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


def _make_bf16_combine(combine):
    round_bf16 = bf16_rounder()

    def bf16_combine(x, y):
        # int64 first: in the simulator a NumPy uint16 would shift its bits out.
        r = combine(bits_f32(np.int64(x) << 16), bits_f32(np.int64(y) << 16))
        return round_bf16(r)
    return device_fn(bf16_combine)


_ELEMENT_TYPES = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16, "f64": np.float64, "i32": np.int32,
                  "i64": np.int64}


def _make_kernel(op, kind, vector):
    combine = device_fn(_COMBINE[op])
    if kind == "bf16":
        combine = _make_bf16_combine(combine)
    load, store = (load4, store4) if vector else (scalar_load4, scalar_store4)
    items, slots, elem = ITEMS, 4 * ITEMS, _ELEMENT_TYPES[kind]

    def reduce_kernel(dst, a, b, n):
        stride = cuda.gridDim.x * cuda.blockDim.x
        tid = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        nq = n >> 2
        xa = cuda.local.array(slots, elem)
        xb = cuda.local.array(slots, elem)
        q0 = tid
        while q0 < nq:
            for k in range(items):            # loads first: dst may be a or b (in place)
                q = q0 + k * stride
                if q < nq:
                    xa[4 * k], xa[4 * k + 1], xa[4 * k + 2], xa[4 * k + 3] = load(a, q)
                    xb[4 * k], xb[4 * k + 1], xb[4 * k + 2], xb[4 * k + 3] = load(b, q)
            for k in range(items):
                q = q0 + k * stride
                if q < nq:
                    store(dst, q, combine(xa[4 * k], xb[4 * k]), combine(xa[4 * k + 1], xb[4 * k + 1]),
                          combine(xa[4 * k + 2], xb[4 * k + 2]), combine(xa[4 * k + 3], xb[4 * k + 3]))
            q0 += items * stride
        i = 4 * nq + tid                      # the last n % 4 elements
        if i < n:
            dst[i] = combine(a[i], b[i])
    return cuda.jit(reduce_kernel)


def _kernel(op, kind, vector):
    key = (op, kind, vector)
    if key not in _kernels:
        _kernels[key] = _make_kernel(op, kind, vector)
    return _kernels[key]


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
    vector = aligned4(av) and aligned4(bv) and aligned4(ov)
    launch(_kernel(op, kind, vector), launch_blocks(max(1, n // 4)), TPB, ov, av, bv, n)
    return out
