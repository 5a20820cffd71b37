"""The FP8 codec's vector path over several blocks per lane group at once: every load of ``tiles`` blocks is
issued before the first shuffle or store, so a lane keeps more bytes in flight (the same bits as move4).
"""
# Lane group g0 of a warp codes blocks g0, g0 + stride, ..., g0 + (tiles - 1) * stride (stride: the blocks the
# whole CUDA block covers per round, so each round stays coalesced across warps). The generic pointers may
# alias, so the compiler cannot move a block's loads above the previous block's stores: without tiling each
# warp alternates "all loads waiting" and "amax shuffles, 1/scale, encode, stores, nothing in flight".
# A lane group whose blocks are all whole and inside [lo, hi) takes unchecked loads and stores ("full");
# otherwise the checked accesses of fp8_ring_quads.py. Shuffles sit at one place for both (a warp may mix).
# ``prefetch`` = d > 0: at each round a lane group also asks L2 for what it reads d rounds later (its input's
# lines, the left's code lines and scale), one line per lane, so HBM keeps fetching while the warps shuffle and
# store (after a barrier every warp of a block starts its loads at once). Only inside [lo, hi) of the current
# step, whose data the left's flag has already published: a hint, no registers, no bits.
from types import SimpleNamespace

import numpy as np
from numba import float32, uint32

from ringlab.kernels.device import SIMULATED, cuda
from ringlab.kernels.flags import pointer_access, prefetch_l2
from ringlab.kernels.fp8_ring_quads import fp8_quad_ops
from ringlab.kernels.intrinsics import shfl_xor_fmax

__all__ = ["fp8_tile_ops", "FORWARD"]

FORWARD = 2
LINE = 128                        # bytes of an L2 line
PREFETCH_ROUNDS = (0, 1, 2, 4)


def check_prefetch(prefetch):
    """``prefetch`` (rounds ahead the lane groups ask L2 for) as an int of PREFETCH_ROUNDS, or a clear error."""
    from ringlab.kernels.ring_layout import check_int
    prefetch = check_int("prefetch", prefetch, 0)
    if prefetch not in PREFETCH_ROUNDS:
        raise ValueError(f"prefetch must be one of {PREFETCH_ROUNDS} (rounds ahead), got {prefetch}")
    return prefetch


def _inlined(fn):
    """A device function inlined at numba's IR level: the local arrays it takes then stay in registers."""
    return cuda.jit(device=True)(fn) if SIMULATED else cuda.jit(device=True, inline="always")(fn)


def _nvvm_inlined(fn):
    """A small device function without local arrays, inlined by NVVM."""
    return cuda.jit(device=True)(fn) if SIMULATED else cuda.jit(device=True, forceinline=True)(fn)


def _word_access(cload4, cstore4):
    """(wload, wstore): codes 4q..4q+3 as one uint32 (code 4q in the low byte), ONE 4-byte access on the GPU
    (the caller's q is a whole quad of an aligned chunk); byte by byte in the simulator, whose memory is by array."""
    if SIMULATED:
        def wload(codes, q):
            c0, c1, c2, c3 = cload4(codes, q)
            return np.uint32(np.int64(c0) | (np.int64(c1) << 8) | (np.int64(c2) << 16) | (np.int64(c3) << 24))

        def wstore(codes, q, w):
            w = np.int64(w)
            cstore4(codes, q, np.uint8(w & 0xFF), np.uint8((w >> 8) & 0xFF), np.uint8((w >> 16) & 0xFF),
                    np.uint8((w >> 24) & 0xFF))
        return cuda.jit(device=True)(wload), cuda.jit(device=True)(wstore)
    load, store = pointer_access(np.uint32)

    def wload(codes, q):
        return load(codes, q)

    def wstore(codes, q, w):
        store(codes, q, np.uint32(w))
    return _nvvm_inlined(wload), _nvvm_inlined(wstore)


def fp8_tile_ops(dtype, op, fmt, block, tiles=1, fwd_tiles=1, lanes=None, prefetch=0):
    """``hop(mode, ...)`` (ENCODE / REDUCE_ENCODE of ``tiles`` = 1 or 2 blocks), ``fwd(mode, ...)`` (FORWARD / DECODE of
    ``fwd_tiles`` blocks) and ``run(mode, ...)``: a CUDA block's warp-uniform loop over blocks [ta, tb), asking L2
    for the blocks ``prefetch`` rounds ahead (0: none)."""
    qo = fp8_quad_ops(dtype, op, fmt, block, lanes)
    lanes, quads, divide = qo.lanes, qo.quads, qo.divide
    load4, store4, cload4, cstore4, sload, sstore = qo.load4, qo.store4, qo.cload4, qo.cstore4, qo.sload, qo.sstore
    wload, wstore = _word_access(cload4, cstore4)
    widen, narrow, encode4, decode4, scale_of, fin_max = qo.widen, qo.narrow, qo.encode4, qo.decode4, qo.scale_of, \
        qo.fin_max
    get4, getw = qo.get4, qo.getw
    move4, store_codes4 = qo.move4, qo.store_codes4
    tiles, fwd_tiles = int(tiles), int(fwd_tiles)
    if tiles not in (1, 2) or fwd_tiles < 1:
        raise ValueError(f"tiles must be 1 or 2 and fwd_tiles >= 1, got {tiles}, {fwd_tiles}")
    prefetch = check_prefetch(prefetch)
    nf = fwd_tiles * quads
    isz = 2 if np.dtype(dtype).itemsize == 2 else 4
    per_line = LINE // isz                           # input elements per line
    src_lines, code_lines = -(-block * isz // LINE), -(-block // LINE)
    one, zero = np.float32(1.0), np.float32(0.0)

    @_inlined
    def load_tile(va, vb, vc, vd, w, mode, src, lc, ls, lo, hi, g, tb, slot, t, full):
        """Block g's values (and, REDUCE_ENCODE, the left's code words): loads only; returns the left's scale."""
        e0 = lo + g * block
        e1, q0 = min(e0 + block, hi), e0 // 4 + t
        active = full or g < tb
        for m in range(quads):
            q = q0 + lanes * m
            a, b, c, d = zero, zero, zero, zero
            if full:
                a, b, c, d = load4(src, q)
                a, b, c, d = widen(a), widen(b), widen(c), widen(d)
            elif active and 4 * q < e1:
                a, b, c, d = get4(src, q, e1)
            va[m], vb[m], vc[m], vd[m] = a, b, c, d
        ps = one
        if mode == 1:
            ps = load_words(w, lc, ls, lo, hi, g, tb, slot, t, full)
        return ps

    @_inlined
    def load_words(w, lc, ls, lo, hi, g, tb, slot, t, full):
        """Block g's code words of (lc, ls) into w (0 outside the block); returns its scale (1 without a block)."""
        e0 = lo + g * block
        e1, q0 = min(e0 + block, hi), e0 // 4 + t
        active = full or g < tb
        ps = one
        if active:
            ps = np.float32(sload(ls, slot))
        for m in range(quads):
            q = q0 + lanes * m
            cw = np.uint32(0)
            if full:
                cw = wload(lc, q)
            elif active and 4 * q < e1:
                cw = getw(lc, q, e1)
            w[m] = cw
        return ps

    @_inlined
    def add_words(va, vb, vc, vd, w, ps):
        for m in range(quads):
            a, b, c, d = decode4(w[m], ps)
            va[m], vb[m], vc[m], vd[m] = va[m] + a, vb[m] + b, vc[m] + c, vd[m] + d

    @_inlined
    def add_tile(va, vb, vc, vd, w, ps, nranks, final):
        """v += D(codes) (decode * scale rounded, then added); / N at avg's final; returns the lane's amax."""
        add_words(va, vb, vc, vd, w, ps)
        if divide and final:
            n32 = float32(nranks)
            for m in range(quads):
                va[m], vb[m], vc[m], vd[m] = va[m] / n32, vb[m] / n32, vc[m] / n32, vd[m] / n32

    @_inlined
    def lane_max(va, vb, vc, vd):
        m_ = zero
        for m in range(quads):
            m_ = fin_max(m_, va[m], vb[m], vc[m], vd[m])
        return m_

    @_inlined
    def store_tile(va, vb, vc, vd, mc, ms, out, lo, hi, g, tb, slot, t, amax, full, final):
        """Quantize block g with the block's amax into our codes and scale slot; ``final``: out = D(codes)."""
        scale = scale_of(amax)
        inv = one / scale
        e0 = lo + g * block
        e1, q0 = min(e0 + block, hi), e0 // 4 + t
        if full:
            if t == 0:
                sstore(ms, slot, scale)
            for m in range(quads):
                q = q0 + lanes * m
                cw = encode4(va[m], vb[m], vc[m], vd[m], inv)
                wstore(mc, q, cw)
                if final:
                    a, b, c, d = decode4(cw, scale)
                    store4(out, q, narrow(a), narrow(b), narrow(c), narrow(d))
        elif g < tb:
            store_codes4(va, vb, vc, vd, mc, ms, out, q0, e1, slot, t, scale, inv, final)

    @_inlined
    def hop(mode, src, out, lc, ls, mc, ms, lo, hi, g0, stride, tb, slot0, t, nranks, final):
        """Blocks g0 (and g0 + stride when tiles = 2): values (+ D(left's codes)), / N at avg's final,
        quantized; ``final``: out too. Both blocks' loads are issued before either's first shuffle."""
        va = cuda.local.array(quads, float32)
        vb = cuda.local.array(quads, float32)
        vc = cuda.local.array(quads, float32)
        vd = cuda.local.array(quads, float32)
        w = cuda.local.array(quads, uint32)
        xa = cuda.local.array(quads, float32)
        xb = cuda.local.array(quads, float32)
        xc = cuda.local.array(quads, float32)
        xd = cuda.local.array(quads, float32)
        x = cuda.local.array(quads, uint32)
        g1 = g0 + stride
        gl = g1 if tiles == 2 else g0
        full = gl < tb and lo + (gl + 1) * block <= hi
        ps = load_tile(va, vb, vc, vd, w, mode, src, lc, ls, lo, hi, g0, tb, slot0 + g0, t, full)
        ps1 = one
        if tiles == 2:
            ps1 = load_tile(xa, xb, xc, xd, x, mode, src, lc, ls, lo, hi, g1, tb, slot0 + g1, t, full)
        if mode == 1:
            add_tile(va, vb, vc, vd, w, ps, nranks, final)
            if tiles == 2:
                add_tile(xa, xb, xc, xd, x, ps1, nranks, final)
        am, am1 = lane_max(va, vb, vc, vd), zero
        if tiles == 2:
            am1 = lane_max(xa, xb, xc, xd)
        off = lanes >> 1
        while off > 0:                                  # both blocks' shuffles interleaved: independent chains
            am = shfl_xor_fmax(am, off)                 # amax is finite: fmax is max
            if tiles == 2:
                am1 = shfl_xor_fmax(am1, off)
            off = off >> 1
        store_tile(va, vb, vc, vd, mc, ms, out, lo, hi, g0, tb, slot0 + g0, t, am, full, final)
        if tiles == 2:
            store_tile(xa, xb, xc, xd, mc, ms, out, lo, hi, g1, tb, slot0 + g1, t, am1, full, final)

    @_inlined
    def fwd(mode, src, out, lc, ls, mc, ms, lo, hi, g0, stride, tb, slot0, t, nranks, final):
        """FORWARD (codes and scale into ours, decoded into out) or DECODE of blocks g0 + u * stride."""
        gl = g0 + (fwd_tiles - 1) * stride
        if not (gl < tb and lo + (gl + 1) * block <= hi):
            for u in range(fwd_tiles):                  # a partial or missing block: move4's checked accesses
                g = g0 + u * stride
                e0 = lo + g * block
                move4(mode, src, out, lc, ls, mc, ms, e0, min(e0 + block, hi), slot0 + g, t, nranks, final, g < tb)
            return
        w = cuda.local.array(nf, uint32)
        ps = cuda.local.array(fwd_tiles, float32)
        for u in range(fwd_tiles):                      # every code word and scale first
            ps[u] = np.float32(sload(ls, slot0 + g0 + u * stride))
            q0 = (lo + (g0 + u * stride) * block) // 4 + t
            for m in range(quads):
                w[u * quads + m] = wload(lc, q0 + lanes * m)
        for u in range(fwd_tiles):
            g = g0 + u * stride
            if mode == FORWARD and t == 0:
                sstore(ms, slot0 + g, ps[u])
            q0 = (lo + g * block) // 4 + t
            for m in range(quads):
                cw, q = w[u * quads + m], q0 + lanes * m
                if mode == FORWARD:
                    wstore(mc, q, cw)
                a, b, c, d = decode4(cw, ps[u])
                store4(out, q, narrow(a), narrow(b), narrow(c), narrow(d))

    @_nvvm_inlined
    def ahead_block(mode, src, lc, ls, lo, hi, g, tb, slot0, t):
        """Lane t's L2 prefetch for block g (one line each, no division: the lanes of a group cover a block's
        input lines (encode / reduce), then its code lines and scale (reduce / forward / decode))."""
        if g < tb:
            e0 = lo + g * block
            ns = 0 if mode >= FORWARD else src_lines
            if t < ns:
                if e0 + t * per_line < hi:
                    prefetch_l2(src, (e0 + t * per_line) * isz)
            elif mode != 0:
                k = t - ns
                if k < code_lines:
                    if e0 + k * LINE < hi:
                        prefetch_l2(lc, e0 + k * LINE)
                elif k == code_lines:
                    prefetch_l2(ls, 4 * (slot0 + g))

    group = 1 if lanes == 1 else 32                 # lanes of a warp (the simulator's ranks are single threads)
    per_warp = group // lanes                       # blocks a warp codes side by side

    @_inlined
    def run(mode, src, out, lc, ls, mc, ms, lo, hi, ta, tb, slot0, lane, nlanes, nranks, final):
        """Blocks [ta, tb) of [lo, hi) by one CUDA block: warp-uniform rounds, every lane in the shuffles."""
        wl = lane % group
        t = wl % lanes
        stride = max(nlanes // group, 1) * per_warp
        gw = ta + (lane // group) * per_warp
        nblk = fwd_tiles if mode >= FORWARD else tiles      # blocks per lane group and round
        a = 1                                       # the first round asks for rounds 1..d, each later one for +d
        while gw < tb:
            if prefetch > 0:
                while a <= prefetch:
                    g = gw + a * stride * nblk + wl // lanes
                    for u in range(nblk):
                        ahead_block(mode, src, lc, ls, lo, hi, g + u * stride, tb, slot0, t)
                    a += 1
                a = prefetch
            if mode >= FORWARD:
                fwd(mode, src, out, lc, ls, mc, ms, lo, hi, gw + wl // lanes, stride, tb, slot0, t, nranks, final)
            else:
                hop(mode, src, out, lc, ls, mc, ms, lo, hi, gw + wl // lanes, stride, tb, slot0, t, nranks, final)
            gw += stride * nblk

    return SimpleNamespace(hop=hop, fwd=fwd, run=run, ahead_block=ahead_block, prefetch=prefetch,
                           load_tile=load_tile, load_words=load_words, add_words=add_words, lane_max=lane_max,
                           store_tile=store_tile, group=group, lanes=lanes, quads=quads, tiles=tiles,
                           fwd_tiles=fwd_tiles, per_warp=per_warp)
