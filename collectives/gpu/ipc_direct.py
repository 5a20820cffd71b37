"""One-shot and two-shot all-reduce over CUDA IPC: the small-message algorithms."""
# Every rank maps every peer's buffers and reads them directly, as vLLM's and TensorRT-LLM's custom
# all-reduce do, trading bytes for steps: 1 or 2 synchronisation points instead of the ring's 2(N-1).
#
#     one-shot : out_r = src_0 (op) src_1 (op) ... (op) src_{N-1}          (every rank, whole buffer)
#     two-shot : out_r[chunk r] = src_0[r] (op) ... (op) src_{N-1}[r]      (reduce-scatter by reads)
#                out_r[chunk c] = out_c[chunk c] for c != r                (all-gather by reads)
#
# Reads happen in rank order 0..N-1 on every rank, so all ranks hold bitwise-identical results.
# Ordering uses device counters, as the ring does (peer_memory.PeerMemory.counters): each phase bumps the
# rank's counter, the next phase waits until every peer's counter got there, and a call returns only after
# every peer has finished reading this rank's buffers. The algorithm is bound at construction.

import numpy as np

from ringlab.errors import resolve_timeout
from ringlab.gpu.peer_memory import PeerMemory, cached_executor, forget_executor, stream_wait, stream_write
from ringlab.kernels.cuda_reduce import OP_CODES
from ringlab.schedule import chunk_bounds

__all__ = ["IpcDirect", "get_ipc_direct", "DIRECT_ALGORITHMS"]

DIRECT_ALGORITHMS = ("oneshot", "twoshot")
_TYPES = {"float16": "__half", "float32": "float", "float64": "double", "int32": "int", "int64": "long long"}
_SOURCE = r"""
#include <cuda_fp16.h>
template <typename T> __device__ __forceinline__ T rl_op(int op, T a, T b) {
  switch (op) {
    case 1: return a * b;
    case 2: return (b > a || b != b) ? b : a;
    case 3: return (b < a || b != b) ? b : a;
    default: return a + b;
  }
}
// out[i] = srcs[0][i] (op) srcs[1][i] (op) ... for i in [lo, hi); avg divides once at the end.
template <typename T>
__global__ void rl_reduce_n(const unsigned long long* __restrict__ srcs, int nsrc, T* __restrict__ out,
                            long long lo, long long hi, int op, T scale) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = lo + blockIdx.x * (long long)blockDim.x + threadIdx.x; i < hi; i += stride) {
    T acc = reinterpret_cast<const T*>(srcs[0])[i];
    for (int k = 1; k < nsrc; ++k) acc = rl_op(op, acc, reinterpret_cast<const T*>(srcs[k])[i]);
    out[i] = (op == 4) ? acc / scale : acc;
  }
}
// out[i] = srcs[owner(i)][i]: gather every chunk from its owner (owner's own chunk is skipped).
template <typename T>
__global__ void rl_gather(const unsigned long long* __restrict__ srcs, const long long* __restrict__ starts,
                          int nchunks, int me, T* __restrict__ out, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride) {
    int c = 0;
    while (c + 1 < nchunks && i >= starts[c + 1]) ++c;
    if (c != me) out[i] = reinterpret_cast<const T*>(srcs[c])[i];
  }
}
"""
_module = None


def _fn(name, dtype):
    global _module
    import cupy
    if _module is None:
        exprs = [f"rl_reduce_n<{t}>" for t in _TYPES.values()] + [f"rl_gather<{t}>" for t in _TYPES.values()]
        _module = cupy.RawModule(code=_SOURCE, options=("--std=c++17",), name_expressions=exprs)
    return _module.get_function(f"{name}<{_TYPES[dtype.name]}>")


def _grid(n):
    return (int(min(max(1, -(-n // 256)), 132 * 8)),), (256,)


class IpcDirect:
    """One-shot or two-shot (``algo``) all-reduce for the ranks of ``comm`` (collective creation and calls)."""

    def __init__(self, comm, algo="oneshot", timeout=None):
        import cupy
        if algo not in DIRECT_ALGORITHMS:
            raise ValueError(f"algo must be one of {', '.join(DIRECT_ALGORITHMS)}, got {algo!r}")
        self.comm, self.algo, self.timeout = comm, algo, resolve_timeout(timeout)
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self.progress = 0                      # value our counter reaches after all enqueued work
        self.peers = PeerMemory(comm)
        n = comm.size
        self.counter, mapped, stream_ops = self.peers.counters(self.stream, set(range(n)))
        if not stream_ops:
            raise RuntimeError("one-shot/two-shot need CUDA stream memory operations")
        self.all_counters = [mapped[k] for k in range(n)] if n > 1 else [self.counter]
        comm.Barrier()

    @property
    def opened(self):
        """Peer mappings held (the leak check counts them)."""
        return self.peers.opened

    def _scratch(self, like):
        """A private buffer for in-place one-shot results (kept, grown on demand)."""
        import cupy
        buf = getattr(self, "_scratch_buf", None)
        if buf is None or buf.nbytes < like.nbytes:
            buf = self._scratch_buf = cupy.empty(max(like.nbytes, 1), dtype=cupy.uint8)
        return buf[: like.nbytes].view(like.dtype)

    def _wait_all(self, value):
        for k, addr in enumerate(self.all_counters):
            if k != self.comm.rank:
                stream_wait(self.stream, addr, value)

    def allreduce(self, src, out, op="sum", timeout=None):
        """out = reduction of every rank's flat ``src`` by the bound algorithm; the host waits at most ``timeout``
        s (default: the executor's) for completion."""
        import cupy
        caller, limit, done = self.peers.begin(self.stream, src, out, timeout, self.timeout)
        if done:
            return True
        n, r = self.comm.size, self.comm.rank
        everyone = self.peers.exchange(src, out)
        srcs = [src if k == r else self.peers.view(everyone[k][0], src) for k in range(n)]
        outs = [out if k == r else self.peers.view(everyone[k][1], src) for k in range(n)]
        src_ptrs = cupy.asarray(np.array([a.data.ptr for a in srcs], dtype=np.uint64))
        code, scale = OP_CODES["avg_last" if op == "avg" else op], src.dtype.type(n)
        base = self.progress
        with self.stream:
            stream_write(self.stream, self.counter, base + 1)          # my input is ready
            self._wait_all(base + 1)
            if self.algo == "oneshot":
                # In place, peers still read our input while we reduce: write to scratch, copy after.
                inplace = out.data.ptr < src.data.ptr + src.nbytes and src.data.ptr < out.data.ptr + out.nbytes
                dst = self._scratch(src) if inplace else out
                grid, block = _grid(src.size)
                _fn("rl_reduce_n", src.dtype)(grid, block, (src_ptrs, np.int32(n), dst, np.int64(0),
                                                            np.int64(src.size), np.int32(code), scale))
                stream_write(self.stream, self.counter, base + 2)      # done reading everyone's input
                self._wait_all(base + 2)
                if inplace:
                    cupy.cuda.runtime.memcpyAsync(out.data.ptr, dst.data.ptr, out.nbytes, 3, self.stream.ptr)
                self.progress = base + 2
            else:
                bounds = chunk_bounds(src.size, n)
                lo, hi = bounds[r]
                grid, block = _grid(hi - lo)
                _fn("rl_reduce_n", src.dtype)(grid, block, (src_ptrs, np.int32(n), out, np.int64(lo), np.int64(hi),
                                                            np.int32(code), scale))
                stream_write(self.stream, self.counter, base + 2)      # my chunk is reduced
                self._wait_all(base + 2)
                out_ptrs = cupy.asarray(np.array([a.data.ptr for a in outs], dtype=np.uint64))
                starts = cupy.asarray(np.array([b[0] for b in bounds], dtype=np.int64))
                grid, block = _grid(src.size)
                _fn("rl_gather", src.dtype)(grid, block, (out_ptrs, starts, np.int32(n), np.int32(r), out,
                                                          np.int64(src.size)))
                stream_write(self.stream, self.counter, base + 3)      # done reading everyone's output
                self._wait_all(base + 3)
                self.progress = base + 3
            # Keep the pointer arrays alive until the kernels that read them have run.
            self._keepalive = (src_ptrs, locals().get("out_ptrs"), locals().get("starts"))
        return self.peers.finish(self.stream, caller, limit)

    def close(self):
        """Release peer mappings and our counter (no barrier: see IpcRing.close)."""
        try:
            self.stream.synchronize()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            pass
        self.peers.close()
        forget_executor(self)


def get_ipc_direct(comm, algo):
    """The ``algo`` ("oneshot" or "twoshot") executor cached on ``comm``, created collectively on first use."""
    return cached_executor(comm, ("direct", algo), lambda: IpcDirect(comm, algo))
