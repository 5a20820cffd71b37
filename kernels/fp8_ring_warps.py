"""The FP8 codec's warp-tile path: kernels/fp8.py's layout (the standalone kernels at 92-95% of a copy) inside
the ring: a warp codes a tile of ``32 * steps`` quads, lane t quad t of each step (the same bits as move4).
"""
# A tile starts on an FP8-block boundary of the part's range [lo + ta * block, min(lo + tb * block, hi)).
# Step j of a tile is 32 consecutive quads (512 B of fp32 per warp access, fully coalesced); block 128 is one
# step, 32 / 64 four / two blocks of a step, 256 two steps. A lane's ``steps`` quads are independent loads in
# flight together, and their amax chains are independent shuffles, where the lane-group path (fp8_ring_tiles.py)
# chains 4 quads of one block. amax: max.f32 (skips NaN) and a warp vote for inf (a second, rare pass), as in
# kernels/fp8.py; width 1 (the simulator's ranks are one thread each) takes fp8_ring_quads.fin_max's comparisons.
from types import SimpleNamespace

import numpy as np
from numba import float32, int64

from ringlab.kernels.device import SIMULATED, cuda
from ringlab.kernels.formats import check_block
from ringlab.kernels.fp8_ring_quads import fp8_quad_ops
from ringlab.kernels.intrinsics import any_lane, fmax_nan_ignoring, shfl_xor_fmax

__all__ = ["fp8_warp_ops", "WARP_STEPS"]

WARP_STEPS = (1, 2, 4)          # quads per lane and tile the ring's warp path compiles for
_FORWARD, _REDUCE = 2, 1


def _inlined(fn):
    """A device function inlined at numba's IR level: the local arrays it takes then stay in registers."""
    return cuda.jit(device=True)(fn) if SIMULATED else cuda.jit(device=True, inline="always")(fn)


def fp8_warp_ops(dtype, op, fmt, block, steps=4, width=None):
    """``run(mode, ...)``: fp8_ring_tiles' run signature over warp tiles of ``steps`` quads per lane.
    ``width``: lanes of a warp (32 on the GPU, 1 in the simulator, where a rank is one thread)."""
    block = check_block(block)
    if int(steps) not in WARP_STEPS:
        raise ValueError(f"warp steps must be one of {WARP_STEPS}, got {steps}")
    qo = fp8_quad_ops(dtype, op, fmt, block, lanes=1)
    load4, sload, sstore = qo.load4, qo.sload, qo.sstore
    get4, put4, getw, putw, store4 = qo.get4, qo.put4, qo.getw, qo.putw, qo.store4
    widen, narrow, encode4, decode4, scale_of, fin_max = qo.widen, qo.narrow, qo.encode4, qo.decode4, qo.scale_of, \
        qo.fin_max
    width = (1 if SIMULATED else 32) if width is None else int(width)
    qpb = block // 4                                  # quads per FP8 block
    span = max(1, qpb // width)                       # steps per FP8 block (block 256: 2 on the GPU)
    nsteps = max(int(steps), span)
    seg_top = min(qpb, width) // 2                    # first xor offset: the block's lanes within a step
    tq = width * nsteps                               # quads per tile
    divide, vote = qo.divide, width > 1              # the warp vote for inf (the simulator's 32-thread tests too)
    one, zero, inf = np.float32(1.0), np.float32(0.0), np.float32(np.inf)

    @_inlined
    def tile_max(am, va, vb, vc, vd):
        """am[j] = this lane's finite amax of step j (NaN and inf left out)."""
        if vote:
            has_inf = False
            for j in range(nsteps):
                m = fmax_nan_ignoring(fmax_nan_ignoring(abs(va[j]), abs(vb[j])),
                                      fmax_nan_ignoring(abs(vc[j]), abs(vd[j])))
                has_inf = has_inf | (m == inf)
                am[j] = m
            if any_lane(has_inf):                     # rare: the finite values only
                for j in range(nsteps):
                    am[j] = fin_max(zero, va[j], vb[j], vc[j], vd[j])
        else:
            for j in range(nsteps):
                am[j] = fin_max(zero, va[j], vb[j], vc[j], vd[j])

    @_inlined
    def block_scales(am, iv):
        """am[j] = the scale of step j's FP8 block (max over its steps and lanes), iv[j] = 1 / scale."""
        for g in range(nsteps // span):
            m = am[g * span]
            for k in range(1, span):
                m = max(m, am[g * span + k])
            off = seg_top
            while off > 0:
                m = shfl_xor_fmax(m, off)             # amax is finite: fmax is max
                off = off >> 1
            scale = scale_of(m)
            inv = one / scale
            for k in range(span):
                am[g * span + k], iv[g * span + k] = scale, inv

    @_inlined
    def hop(mode, src, out, lc, ls, mc, ms, qa, e1, r0, slot0, nranks, final):
        """ENCODE / REDUCE_ENCODE of the tile at relative quad r0 + lane (quads qa + r, elements < e1)."""
        va = cuda.local.array(nsteps, float32)
        vb = cuda.local.array(nsteps, float32)
        vc = cuda.local.array(nsteps, float32)
        vd = cuda.local.array(nsteps, float32)
        am = cuda.local.array(nsteps, float32)
        iv = cuda.local.array(nsteps, float32)
        wq = cuda.local.array(nsteps, int64)
        full = 4 * (qa + r0 - r0 % width + tq) <= e1  # warp-uniform: the whole tile inside
        for j in range(nsteps):                      # every load of the tile before any use
            r = r0 + width * j
            q = qa + r
            if full:
                a, b, c, d = load4(src, q)
                va[j], vb[j], vc[j], vd[j] = widen(a), widen(b), widen(c), widen(d)
            elif 4 * q < e1:
                va[j], vb[j], vc[j], vd[j] = get4(src, q, e1)
            else:
                va[j], vb[j], vc[j], vd[j] = zero, zero, zero, zero
            if mode == _REDUCE:
                am[j] = one
                wq[j] = 0
                if 4 * q < e1:
                    am[j] = np.float32(sload(ls, slot0 + r // qpb))
                    wq[j] = getw(lc, q, e1)
        if mode == _REDUCE:
            for j in range(nsteps):
                a, b, c, d = decode4(wq[j], am[j])
                a, b, c, d = va[j] + a, vb[j] + b, vc[j] + c, vd[j] + d
                if divide and final:
                    n32 = float32(nranks)
                    a, b, c, d = a / n32, b / n32, c / n32, d / n32
                va[j], vb[j], vc[j], vd[j] = a, b, c, d
        tile_max(am, va, vb, vc, vd)
        block_scales(am, iv)
        for j in range(nsteps):
            r = r0 + width * j
            q = qa + r
            if 4 * q < e1:
                w = encode4(va[j], vb[j], vc[j], vd[j], iv[j])
                if r % qpb == 0:
                    sstore(ms, slot0 + r // qpb, am[j])
                putw(mc, q, e1, w)
                if final:
                    a, b, c, d = decode4(w, am[j])
                    if full:
                        store4(out, q, narrow(a), narrow(b), narrow(c), narrow(d))
                    else:
                        put4(out, q, e1, a, b, c, d)

    @_inlined
    def fwd(mode, out, lc, ls, mc, ms, qa, e1, r0, slot0):
        """FORWARD (the left's codes and scales into ours, decoded into out) or DECODE of the tile at r0 + lane."""
        ps = cuda.local.array(nsteps, float32)
        wq = cuda.local.array(nsteps, int64)
        full = 4 * (qa + r0 - r0 % width + tq) <= e1
        for j in range(nsteps):
            r = r0 + width * j
            q = qa + r
            ps[j], wq[j] = one, 0
            if 4 * q < e1:
                ps[j] = np.float32(sload(ls, slot0 + r // qpb))
                wq[j] = getw(lc, q, e1)
        for j in range(nsteps):
            r = r0 + width * j
            q = qa + r
            if 4 * q < e1:
                w = wq[j]
                if mode == _FORWARD:
                    if r % qpb == 0:
                        sstore(ms, slot0 + r // qpb, ps[j])
                    putw(mc, q, e1, w)
                a, b, c, d = decode4(w, ps[j])
                if full:
                    store4(out, q, narrow(a), narrow(b), narrow(c), narrow(d))
                else:
                    put4(out, q, e1, a, b, c, d)

    @_inlined
    def run(mode, src, out, lc, ls, mc, ms, lo, hi, ta, tb, slot0, lane, nlanes, nranks, final):
        """Blocks [ta, tb) of [lo, hi) by one CUDA block: each warp its tiles, warp-uniform, every lane in the
        shuffles (lo is a multiple of 4: the caller's aligned path)."""
        e0 = lo + ta * block
        e1 = min(lo + tb * block, hi)
        if e1 <= e0:
            return
        qa = e0 // 4
        ntiles = ((e1 - e0 + 3) // 4 + tq - 1) // tq
        nwarps = max(nlanes // width, 1)
        wl = lane % width
        s0 = slot0 + ta
        tile = lane // width
        while tile < ntiles:
            r0 = tile * tq + wl
            if mode >= _FORWARD:
                fwd(mode, out, lc, ls, mc, ms, qa, e1, r0, s0)
            else:
                hop(mode, src, out, lc, ls, mc, ms, qa, e1, r0, s0, nranks, final)
            tile += nwarps

    return SimpleNamespace(run=run, hop=hop, fwd=fwd, steps=nsteps, width=width, tile_quads=tq)
