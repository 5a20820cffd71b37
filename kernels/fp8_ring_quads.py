"""The FP8 codec's vector path: a lane moves quads (four consecutive elements, one 16/8-byte access, one 4-byte
code word) for chunks whose start and buffers are aligned; the same bits as the element path.
"""
# An FP8 block of B elements is B/4 quads on L = max(8, B/16) lanes of one warp, Q = B/(4L) quads each:
# B = 32 -> 8 lanes x 1 quad, 64 -> 8 x 2, 128 -> 8 x 4, 256 -> 16 x 4; a warp codes 32/L blocks at once.
# A lane's Q quads are independent loads, in flight together (what hides HBM latency with one 512-thread
# block per SM); a warp access covers whole 32-byte sectors. amax: xor shuffles over the block's L lanes.
# Codes: kernels/fp8.py's encode4/decode4 (the GPU's FP8 conversions on sm_89+, NaN/inf patched to the
# policy; the software codec elsewhere and in the simulator).
# A quad that straddles the chunk's end falls back to element accesses (zeros beyond it, nothing stored).
from types import SimpleNamespace

import numpy as np
from numba import float32

from ringlab.kernels.device import SIMULATED, cuda, hardware_fp8
from ringlab.kernels.flags import pointer_access, quad_access
from ringlab.kernels.formats import check_block, fp8_format
from ringlab.kernels.fp8 import _codec
from ringlab.kernels.fp8_access import _narrow, _widen
from ringlab.kernels.intrinsics import shfl_xor_fmax

__all__ = ["fp8_quad_ops", "lanes_per_block"]

_STORAGE = {"float32": (np.float32, "f32"), "float16": (np.float16, "f16"), "bfloat16": (np.uint16, "bf16")}
_FORWARD = 2


def _inlined(fn):
    """A device function inlined at numba's IR level: the local arrays it takes then stay in registers."""
    return cuda.jit(device=True)(fn) if SIMULATED else cuda.jit(device=True, inline="always")(fn)


def _nvvm_inlined(fn):
    """A small device function NVVM inlines (numba-IR inlining at every call site compiles several times slower)."""
    return cuda.jit(device=True)(fn) if SIMULATED else cuda.jit(device=True, forceinline=True)(fn)


def lanes_per_block(block):
    """Lanes of one FP8 block on the vector path (1 in the simulator, where a rank is one thread)."""
    return 1 if SIMULATED else max(8, check_block(block) // 16)


def fp8_quad_ops(dtype, op, fmt, block, lanes=None):
    """``move4(mode, ..., active)`` (the modes of fp8_ring_codec) and its parts over quads; every lane of a
    warp must call it together (``active`` False: a lane without a block of its own joins the shuffles).
    ``lanes`` per block: lanes_per_block's by default (tests run the GPU's in the simulator)."""
    f, block = fp8_format(fmt), check_block(block)
    storage, kind = _STORAGE[np.dtype(dtype).name]
    load, store = pointer_access(storage)
    load4, store4 = quad_access(storage)
    cload, cstore = pointer_access(np.uint8)
    cload4, cstore4 = quad_access(np.uint8)
    sload, sstore = pointer_access(np.float32)
    widen, narrow = _widen(kind), _narrow(kind)
    encode4, decode4, scale_of, _ = _codec(f, hardware_fp8())
    lanes = lanes_per_block(block) if lanes is None else int(lanes)
    quads = block // (4 * lanes)
    one, zero, inf = np.float32(1.0), np.float32(0.0), np.float32(np.inf)
    divide = op == "avg"

    @_nvvm_inlined
    def seg_max(m):
        off = lanes >> 1
        while off > 0:
            m = shfl_xor_fmax(m, off)                  # amax is finite: fmax is max
            off = off >> 1
        return m

    @_nvvm_inlined
    def fin_max(m, a, b, c, d):
        """max(m, |finite values|): NaN and inf stay out of amax (no loop over a tuple: that lives in local memory)."""
        a, b, c, d = abs(a), abs(b), abs(c), abs(d)           # selects and max, no branch (NaN < inf is False)
        m = max(m, a if a < inf else zero)
        m = max(m, b if b < inf else zero)
        m = max(m, c if c < inf else zero)
        return max(m, d if d < inf else zero)

    @_nvvm_inlined
    def get4(src, q, e1):
        """Elements 4q..4q+3 of src in fp32 (0 at and beyond e1)."""
        if 4 * q + 4 <= e1:
            v0, v1, v2, v3 = load4(src, q)
            return widen(v0), widen(v1), widen(v2), widen(v3)
        i = 4 * q
        return (widen(load(src, i)) if i < e1 else zero, widen(load(src, i + 1)) if i + 1 < e1 else zero,
                widen(load(src, i + 2)) if i + 2 < e1 else zero, widen(load(src, i + 3)) if i + 3 < e1 else zero)

    @_nvvm_inlined
    def put4(out, q, e1, a, b, c, d):
        if 4 * q + 4 <= e1:
            store4(out, q, narrow(a), narrow(b), narrow(c), narrow(d))
            return
        i = 4 * q
        if i < e1:
            store(out, i, narrow(a))
        if i + 1 < e1:
            store(out, i + 1, narrow(b))
        if i + 2 < e1:
            store(out, i + 2, narrow(c))

    @_nvvm_inlined
    def getw(codes, q, e1):
        """Codes 4q..4q+3 as one word, code 4q in the low byte (0 at and beyond e1)."""
        if 4 * q + 4 <= e1:
            c0, c1, c2, c3 = cload4(codes, q)
            return np.int64(c0) | (np.int64(c1) << 8) | (np.int64(c2) << 16) | (np.int64(c3) << 24)
        w = np.int64(0)
        for k in range(3):
            if 4 * q + k < e1:
                w |= np.int64(cload(codes, 4 * q + k)) << (8 * k)
        return w

    @_nvvm_inlined
    def putw(codes, q, e1, w):
        if 4 * q + 4 <= e1:
            cstore4(codes, q, np.uint8(w & 0xFF), np.uint8((w >> 8) & 0xFF), np.uint8((w >> 16) & 0xFF),
                    np.uint8((w >> 24) & 0xFF))
            return
        for k in range(3):
            if 4 * q + k < e1:
                cstore(codes, 4 * q + k, np.uint8((w >> (8 * k)) & 0xFF))

    @_inlined
    def add_decoded4(va, vb, vc, vd, lc, ls, q0, e1, slot, active):
        """v += D(codes) over this lane's quads, fp32 (decode * scale rounded, then added)."""
        if active:
            ps = np.float32(sload(ls, slot))
            for m in range(quads):
                q = q0 + lanes * m
                if 4 * q < e1:
                    a, b, c, d = decode4(getw(lc, q, e1), ps)
                    va[m], vb[m], vc[m], vd[m] = va[m] + a, vb[m] + b, vc[m] + c, vd[m] + d

    @_inlined
    def store_codes4(va, vb, vc, vd, mc, ms, out, q0, e1, slot, t, scale, inv, write_out):
        """The block's codes (values * inv) and scale into ours, checked against e1; ``write_out``: out = D(codes)."""
        if t == 0:
            sstore(ms, slot, scale)
        for m in range(quads):
            q = q0 + lanes * m
            if 4 * q < e1:
                w = encode4(va[m], vb[m], vc[m], vd[m], inv)
                putw(mc, q, e1, w)
                if write_out:
                    a, b, c, d = decode4(w, scale)
                    put4(out, q, e1, a, b, c, d)

    @_inlined
    def encode_store4(va, vb, vc, vd, mc, ms, out, q0, e1, slot, t, active, write_out):
        """Quantize the block (this lane's quads, amax over the block's lanes); ``write_out``: out = D(codes)."""
        amax = zero
        for m in range(quads):
            amax = fin_max(amax, va[m], vb[m], vc[m], vd[m])
        amax = seg_max(amax)
        scale = scale_of(amax)
        if active:
            store_codes4(va, vb, vc, vd, mc, ms, out, q0, e1, slot, t, scale, one / scale, write_out)

    @_inlined
    def load_values4(va, vb, vc, vd, src, q0, e1, active):
        for m in range(quads):
            q = q0 + lanes * m
            a, b, c, d = zero, zero, zero, zero
            if active and 4 * q < e1:
                a, b, c, d = get4(src, q, e1)
            va[m], vb[m], vc[m], vd[m] = a, b, c, d

    @_inlined
    def move4(mode, src, out, lc, ls, mc, ms, e0, e1, slot, t, nranks, final, active):
        q0 = e0 // 4 + t
        if mode >= _FORWARD:                           # codes travel unchanged: decode them into out
            if active:
                ps = np.float32(sload(ls, slot))
                if mode == _FORWARD and t == 0:
                    sstore(ms, slot, ps)
                for m in range(quads):
                    q = q0 + lanes * m
                    if 4 * q < e1:
                        w = getw(lc, q, e1)
                        if mode == _FORWARD:
                            putw(mc, q, e1, w)
                        a, b, c, d = decode4(w, ps)
                        put4(out, q, e1, a, b, c, d)
            return
        va = cuda.local.array(quads, float32)
        vb = cuda.local.array(quads, float32)
        vc = cuda.local.array(quads, float32)
        vd = cuda.local.array(quads, float32)
        load_values4(va, vb, vc, vd, src, q0, e1, active)
        if mode == 1:                                  # REDUCE_ENCODE
            add_decoded4(va, vb, vc, vd, lc, ls, q0, e1, slot, active)
            if divide and final:
                for m in range(quads):
                    n32 = float32(nranks)
                    va[m], vb[m], vc[m], vd[m] = va[m] / n32, vb[m] / n32, vc[m] / n32, vd[m] / n32
        encode_store4(va, vb, vc, vd, mc, ms, out, q0, e1, slot, t, active, final)

    return SimpleNamespace(move4=move4, load_values4=load_values4, add_decoded4=add_decoded4,
                           encode_store4=encode_store4, store_codes4=store_codes4, lanes=lanes, quads=quads, divide=divide, seg_max=seg_max,
                           fin_max=fin_max, get4=get4, put4=put4, getw=getw, putw=putw, encode4=encode4,
                           decode4=decode4, scale_of=scale_of, widen=widen, narrow=narrow, load4=load4,
                           store4=store4, cload4=cload4, cstore4=cstore4, sload=sload, sstore=sstore)
