"""Vectorised CUDA reduce kernel for the IPC rings: out = a (op) b with 16-byte loads and stores."""
# CuPy's ElementwiseKernel moves one element per thread per iteration; packing 16 bytes per access
# reaches the device-copy rate (docs/gpu_datapath.md, experiments/ipc_microbench.py). Pointers must share 16-byte alignment; otherwise callers fall back
# to the elementwise kernel.

import numpy as np

from ringlab.kernels.optable import AVG_LAST_CODE, DEVICE_DTYPES, OP_TABLE

__all__ = ["reduce_kernel_vec", "step_kernel", "TASK_DTYPE", "OP_CODES"]

OP_CODES = {**{name: op.code for name, op in OP_TABLE.items()}, "avg_last": AVG_LAST_CODE}   # kernels/optable.py
_TYPES = {"float16": "__half", "float32": "float", "float64": "double", "int32": "int", "int64": "long long"}
assert tuple(_TYPES) == DEVICE_DTYPES
_SOURCE = r"""
#include <cuda_fp16.h>
template <typename T> __device__ __forceinline__ T rl_apply(int op, T a, T b, T n) {
  switch (op) {
    case 0: return a + b;
    case 1: return a * b;
    case 2: return (b > a || b != b) ? b : a;   // NaN propagates, as numpy.maximum
    case 3: return (b < a || b != b) ? b : a;
    default: return (a + b) / n;                 // avg: sum, then one division at the owner
  }
}
template <typename T>
__global__ void rl_reduce(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ out,
                          long long n, int op, T scale) {
  constexpr int V = 16 / sizeof(T);
  struct alignas(16) Pack { T v[V]; };
  const long long nv = n / V;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  for (long long i = tid; i < nv; i += stride) {
    Pack x = reinterpret_cast<const Pack*>(a)[i];
    Pack y = reinterpret_cast<const Pack*>(b)[i];
    Pack z;
#pragma unroll
    for (int k = 0; k < V; ++k) z.v[k] = rl_apply(op, x.v[k], y.v[k], scale);
    reinterpret_cast<Pack*>(out)[i] = z;
  }
  const long long t = nv * V + tid;                 // the last n % V elements
  if (t < n) out[t] = rl_apply(op, a[t], b[t], scale);
}

// One ring step for many ranks at once (blockIdx.y = task): out[i] = a[i] (op) b[i] for i in
// [lo, hi), or out[i] = b[i] when copy != 0. Vector body, scalar head and tail.
struct RlTask { unsigned long long a, b, out; long long lo, hi; };
template <typename T>
__global__ void rl_step(const RlTask* __restrict__ tasks, int op, T scale, int copy) {
  const RlTask t = tasks[blockIdx.y];
  const T* a = reinterpret_cast<const T*>(t.a);
  const T* b = reinterpret_cast<const T*>(t.b);
  T* out = reinterpret_cast<T*>(t.out);
  constexpr int V = 16 / sizeof(T);
  struct alignas(16) Pack { T v[V]; };
  const bool aligned = ((t.a | t.b | t.out) & 15ull) == 0;
  long long vlo = aligned ? ((t.lo + V - 1) / V) * V : t.hi;
  if (vlo > t.hi) vlo = t.hi;
  const long long vhi = vlo + ((t.hi - vlo) / V) * V;
  const long long stride = (long long)gridDim.x * blockDim.x;
  const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x;
  for (long long i = vlo / V + tid; i < vhi / V; i += stride) {
    Pack y = reinterpret_cast<const Pack*>(b)[i];
    if (!copy) {
      Pack x = reinterpret_cast<const Pack*>(a)[i];
#pragma unroll
      for (int k = 0; k < V; ++k) y.v[k] = rl_apply(op, x.v[k], y.v[k], scale);
    }
    reinterpret_cast<Pack*>(out)[i] = y;
  }
  for (long long i = t.lo + tid; i < vlo; i += stride) out[i] = copy ? b[i] : rl_apply(op, a[i], b[i], scale);
  for (long long i = vhi + tid; i < t.hi; i += stride) out[i] = copy ? b[i] : rl_apply(op, a[i], b[i], scale);
}
"""
TASK_DTYPE = np.dtype([("a", "<u8"), ("b", "<u8"), ("out", "<u8"), ("lo", "<i8"), ("hi", "<i8")])
_module = None
_sms = None


def _functions():
    global _module, _sms
    if _module is None:
        import cupy
        _module = cupy.RawModule(code=_SOURCE, options=("--std=c++17",),
                                 name_expressions=[f"rl_reduce<{t}>" for t in _TYPES.values()]
                                 + [f"rl_step<{t}>" for t in _TYPES.values()])
        _sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    return _module


def reduce_kernel_vec(a, b, out, op, nranks=1):
    """Launch out = a (op) b on the current stream; returns False (nothing launched) when the
    dtype or the pointers' alignment does not suit the vector kernel."""
    name = a.dtype.name
    if name not in _TYPES or not (a.data.ptr % 16 == b.data.ptr % 16 == out.data.ptr % 16 == 0):
        return False
    n = a.size
    if n == 0:
        return True
    fn = _functions().get_function(f"rl_reduce<{_TYPES[name]}>")
    per_thread = 16 // a.dtype.itemsize
    threads = 256
    blocks = int(min(max(1, -(-n // (per_thread * threads))), _sms * 8))
    fn((blocks,), (threads,), (a, b, out, np.int64(n), np.int32(OP_CODES[op]), a.dtype.type(nranks)))
    return True


def step_kernel(tasks_dev, ntasks, dtype, op, nranks, copy, longest):
    """Launch one ring step for ``ntasks`` ranks: ``tasks_dev`` is the device address (int) of
    TASK_DTYPE records, ``longest`` is the longest [lo, hi) range in elements."""
    dtype = np.dtype(dtype)
    if ntasks == 0 or longest == 0:
        return
    fn = _functions().get_function(f"rl_step<{_TYPES[dtype.name]}>")
    per_thread = 16 // dtype.itemsize
    threads = 256
    blocks = int(min(max(1, -(-longest // (per_thread * threads))), max(1, _sms * 8 // ntasks)))
    fn((blocks, ntasks), (threads,), (np.uint64(tasks_dev), np.int32(OP_CODES[op]), dtype.type(nranks), np.int32(copy)))
