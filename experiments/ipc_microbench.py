"""Where the time of the shared-GPU ring goes: kernel and copy throughput by chunk size, one process.

    python experiments/ipc_microbench.py          (rank-free; needs a GPU: elsewhere it says so and exits 69)
Prints GB/s (bytes read + written) for the CuPy elementwise reduce, a float4 RawKernel reduce and a
device copy, at the chunk sizes the ring uses, and the ring's op sequence for N = 2, 4, 8 replayed
on local buffers (what the ring would take with zero synchronisation cost).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.bench.harness import require_gpu  # noqa: E402

ADD4_SOURCE = r"""
extern "C" __global__ void add_f32x4(const float4* a, const float4* b, float4* out, long long n4) {
  long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n4; i += stride) {
    float4 x = a[i], y = b[i];
    out[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
  }
}"""


def timed(fn, reps=20):
    import cupy
    for _ in range(3):
        fn()
    s, e = cupy.cuda.Event(), cupy.cuda.Event()
    ts = []
    for _ in range(reps):
        s.record()
        fn()
        e.record()
        e.synchronize()
        ts.append(cupy.cuda.get_elapsed_time(s, e) * 1e-3)
    return float(np.median(ts))


def main(argv=None):
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    require_gpu("ipc_microbench.py")
    import cupy
    ADD4 = cupy.RawKernel(ADD4_SOURCE, "add_f32x4")
    ADD = cupy.ElementwiseKernel("T a, T b", "T out", "out = a + b", "mb_add")
    sms = cupy.cuda.runtime.getDeviceProperties(0)["multiProcessorCount"]
    print(f"{'chunk':>8s} {'elementwise':>12s} {'float4 raw':>11s} {'copy':>8s}   (GB/s, read + write)")
    for mb in (8, 32, 64, 128):
        n = mb * (1 << 20) // 4
        a, b = cupy.random.random(n, dtype=cupy.float32), cupy.random.random(n, dtype=cupy.float32)
        out = cupy.empty_like(a)
        t_ew = timed(lambda: ADD(a, b, out))
        assert bool(cupy.allclose(out, a + b))
        t_raw = timed(lambda: ADD4((sms * 8,), (256,), (a, b, out, np.int64(n // 4))))
        assert bool(cupy.allclose(out, a + b))
        t_cp = timed(lambda: cupy.cuda.runtime.memcpyAsync(out.data.ptr, a.data.ptr, a.nbytes, 4,
                                                          cupy.cuda.get_current_stream().ptr))
        print(f"{mb:>6d}MB {3 * a.nbytes / t_ew / 1e9:12.0f} {3 * a.nbytes / t_raw / 1e9:11.0f} {2 * a.nbytes / t_cp / 1e9:8.0f}")
    for nranks in (2, 4, 8):
        size = 256 << 20
        count = size // 4
        srcs = [cupy.random.random(count, dtype=cupy.float32) for _ in range(nranks)]
        outs = [cupy.empty_like(s) for s in srcs]
        c = count // nranks

        def ring():
            for s in range(nranks - 1):
                for k in range(nranks):
                    ch = (k - s - 1) % nranks
                    sl = slice(ch * c, (ch + 1) * c)
                    ADD(srcs[k][sl], (srcs if s == 0 else outs)[k - 1][sl], outs[k][sl])
            for s in range(nranks - 1):
                for k in range(nranks):
                    ch = (k - s) % nranks
                    cupy.cuda.runtime.memcpyAsync(outs[k].data.ptr + ch * c * 4, outs[k - 1].data.ptr + ch * c * 4,
                                                  c * 4, 4, cupy.cuda.get_current_stream().ptr)
        t = timed(ring, reps=10)
        ref = sum(s.astype(cupy.float64) for s in srcs)
        assert all(bool(cupy.allclose(o, ref, rtol=1e-5)) for o in outs)
        print(f"local replay of the ring op sequence, N={nranks}, 256 MB: {t * 1e6:8.0f} us "
              f"= {5 * (nranks - 1) * size / t / 1e9:5.0f} GB/s of HBM traffic")
    return 0


if __name__ == "__main__":
    sys.exit(main())
