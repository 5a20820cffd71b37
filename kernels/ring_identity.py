"""The identity codec of the ring kernel: elements travel as they are (reduce or copy from the left's buffers).

``identity_moves(dtype, op)`` gives the per-primitive data movement the one ring walk (ring_kernel.py) calls.
"""
from types import SimpleNamespace

import numpy as np

from ringlab.kernels.device import cuda
from ringlab.kernels.flags import pointer_access, quad_access
from ringlab.kernels.optable import combine_of
from ringlab.kernels.ring_layout import FINAL, REDUCE

__all__ = ["identity_moves", "combine_function"]


def combine_function(op, dtype):
    """Device function ``(local, peer, nranks, final) -> value`` in ``dtype``'s rules (host ring's results)."""
    dt = np.dtype(dtype)
    half = dt == np.float16                                 # compile-time constants below
    wide = np.float32 if half else dt.type                  # f16 computed in f32, rounded once (as NumPy)
    narrow = dt.type
    divide = op == "avg"

    how = combine_of(op)
    if how == "sum":
        def combine(a, b, n, final):
            s = wide(a) + wide(b)
            if divide and final:
                if half:
                    s = wide(narrow(s))                     # the sum is rounded to f16, then divided
                s = s / wide(n)
            return narrow(s)
    elif how == "prod":
        def combine(a, b, n, final):
            return narrow(wide(a) * wide(b))
    elif how == "max":
        def combine(a, b, n, final):              # NaN propagates like numpy.maximum
            x, y = wide(a), wide(b)
            return narrow(y if (y > x or y != y) else x)
    else:
        def combine(a, b, n, final):
            x, y = wide(a), wide(b)
            return narrow(y if (y < x or y != y) else x)
    return cuda.jit(device=True)(combine)


def identity_moves(dtype, op):
    """(first, step) device functions of the identity codec for (dtype, op); see ring_kernel.py's walk."""
    load, store = pointer_access(dtype)
    load4, store4 = quad_access(dtype)
    combine = combine_function(op, dtype)

    @cuda.jit(device=True)
    def reduce_range(src, peer, out, a, b, lane, nlanes, nranks, final):
        """out[j] = src[j] (op) peer[j] for j in [a, b): four independent loads per input in flight."""
        j = a + lane
        while j + 3 * nlanes < b:
            s0, s1, s2, s3 = load(src, j), load(src, j + nlanes), load(src, j + 2 * nlanes), load(src, j + 3 * nlanes)
            q0, q1, q2, q3 = load(peer, j), load(peer, j + nlanes), load(peer, j + 2 * nlanes), load(peer, j + 3 * nlanes)
            store(out, j, combine(s0, q0, nranks, final))
            store(out, j + nlanes, combine(s1, q1, nranks, final))
            store(out, j + 2 * nlanes, combine(s2, q2, nranks, final))
            store(out, j + 3 * nlanes, combine(s3, q3, nranks, final))
            j += 4 * nlanes
        while j < b:
            store(out, j, combine(load(src, j), load(peer, j), nranks, final))
            j += nlanes

    @cuda.jit(device=True)
    def reduce_quads(src, peer, out, a, b, lane, nlanes, nranks, final):
        """The same over quads (16-byte vector accesses) for [a4, b4), scalar head and tail."""
        a4 = min((a + 3) // 4 * 4, b)
        b4 = max(b // 4 * 4, a4)
        j = a + lane
        while j < a4:
            store(out, j, combine(load(src, j), load(peer, j), nranks, final))
            j += nlanes
        j = b4 + lane
        while j < b:
            store(out, j, combine(load(src, j), load(peer, j), nranks, final))
            j += nlanes
        q, qe = a4 // 4 + lane, b4 // 4
        while q + nlanes < qe:
            s0, s1, s2, s3 = load4(src, q)
            t0, t1, t2, t3 = load4(src, q + nlanes)
            p0, p1, p2, p3 = load4(peer, q)
            u0, u1, u2, u3 = load4(peer, q + nlanes)
            store4(out, q, combine(s0, p0, nranks, final), combine(s1, p1, nranks, final),
                   combine(s2, p2, nranks, final), combine(s3, p3, nranks, final))
            store4(out, q + nlanes, combine(t0, u0, nranks, final), combine(t1, u1, nranks, final),
                   combine(t2, u2, nranks, final), combine(t3, u3, nranks, final))
            q += 2 * nlanes
        if q < qe:
            s0, s1, s2, s3 = load4(src, q)
            p0, p1, p2, p3 = load4(peer, q)
            store4(out, q, combine(s0, p0, nranks, final), combine(s1, p1, nranks, final),
                   combine(s2, p2, nranks, final), combine(s3, p3, nranks, final))

    @cuda.jit(device=True)
    def copy_quads(peer, out, a, b, lane, nlanes):
        a4 = min((a + 3) // 4 * 4, b)
        b4 = max(b // 4 * 4, a4)
        j = a + lane
        while j < a4:
            store(out, j, load(peer, j))
            j += nlanes
        j = b4 + lane
        while j < b:
            store(out, j, load(peer, j))
            j += nlanes
        q, qe = a4 // 4 + lane, b4 // 4
        while q + nlanes < qe:
            p0, p1, p2, p3 = load4(peer, q)
            u0, u1, u2, u3 = load4(peer, q + nlanes)
            store4(out, q, p0, p1, p2, p3)
            store4(out, q + nlanes, u0, u1, u2, u3)
            q += 2 * nlanes
        if q < qe:
            p0, p1, p2, p3 = load4(peer, q)
            store4(out, q, p0, p1, p2, p3)

    @cuda.jit(device=True)
    def copy_range(peer, out, a, b, lane, nlanes):
        j = a + lane
        while j + 3 * nlanes < b:
            q0, q1, q2, q3 = load(peer, j), load(peer, j + nlanes), load(peer, j + 2 * nlanes), load(peer, j + 3 * nlanes)
            store(out, j, q0)
            store(out, j + nlanes, q1)
            store(out, j + 2 * nlanes, q2)
            store(out, j + 3 * nlanes, q3)
            j += 4 * nlanes
        while j < b:
            store(out, j, load(peer, j))
            j += nlanes

    @cuda.jit(device=True)
    def part(lo, hi, k, nslices, p, nparts):
        """[a, b) of block p in slice k of [lo, hi): slices and parts split as evenly as chunk_bounds does."""
        n = hi - lo
        q, r = n // nslices, n % nslices
        s0 = lo + k * q + min(k, r)
        m = q + (1 if k < r else 0)
        q2, r2 = m // nparts, m % nparts
        a = s0 + p * q2 + min(p, r2)
        return a, a + q2 + (1 if p < r2 else 0)

    @cuda.jit(device=True)
    def copy(src, dst, a, b, lane, nlanes):
        """dst[a:b] = src[a:b] (a staged call's copy in or out), vector accesses when both are 16-byte aligned."""
        if (src & np.uint64(15)) == 0 and (dst & np.uint64(15)) == 0:
            copy_quads(src, dst, a, b, lane, nlanes)
        else:
            copy_range(src, dst, a, b, lane, nlanes)

    @cuda.jit(device=True)
    def first(src, mc, ms, lo, hi, chunk, nbc, k, nslices, p, nparts, lane, nlanes, aligned):
        pass                                        # never called: primitive 0 moves no data (has_first False)

    @cuda.jit(device=True)
    def step(src, out, peer, mc, ms, lc, ls, nbc, lo, hi, chunk, bits, last, k, nslices, p, nparts, lane, nlanes,
             nranks, aligned):
        """Slice k of part p: out = src (op) left's, or a copy of the left's, for this primitive's chunk."""
        a, b = part(lo, hi, k, nslices, p, nparts)
        final = (bits & FINAL) != 0
        if bits & REDUCE:
            if aligned:
                reduce_quads(src, peer, out, a, b, lane, nlanes, nranks, final)
            else:
                reduce_range(src, peer, out, a, b, lane, nlanes, nranks, final)
        elif aligned:
            copy_quads(peer, out, a, b, lane, nlanes)
        else:
            copy_range(peer, out, a, b, lane, nlanes)

    return SimpleNamespace(first=first, step=step, has_first=False, uses_codec_columns=False, copy=copy, part=part)
