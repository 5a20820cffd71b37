"""The FP8 codec of the persistent ring kernels: per-block device functions over codes + fp32 block scales.

Same policy and bits as kernels/reference.py (software codec of fp8_bits.py); one lane group per FP8 block.
"""
# A chunk [lo, hi) travels as codes at the chunk's own element positions of a per-rank send buffer and one
# fp32 scale per block of ``block`` elements counted from lo, in scale slot chunk * chunk_blocks + t.
# Slices and parts split a chunk on block boundaries (``block_part``), so every block is coded by one lane
# group. Element path (any alignment): a warp per block on the GPU (lane t holds elements t, t + 32, ...:
# coalesced, amax by xor shuffles), one thread in the simulator (a rank is one thread there). Chunks that
# start on a quad with 16-byte aligned buffers take the vector path of fp8_ring_quads.py (same bits).
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from numba import float32

from ringlab.kernels.device import SIMULATED, bits_f32, cuda, device_fn, f32_bits, fmul_rn
from ringlab.kernels.flags import pointer_access
from ringlab.kernels.formats import check_block, check_fp8_input_dtype, fp8_format
from ringlab.kernels.fp8_access import _narrow, _widen
from ringlab.kernels.fp8_bits import make_fp8_value_codec
from ringlab.kernels.intrinsics import shfl_xor_fmax
from ringlab.kernels.reference import MIN_SCALE
from ringlab.kernels.ring_layout import Codec, check_int
from ringlab.kernels.ring_layout import FINAL, REDUCE

__all__ = ["fp8_block_ops", "fp8_moves", "block_part", "FP8_KERNEL_DTYPES", "FP8_KERNEL_OPS", "GROUP",
           "ENCODE", "REDUCE_ENCODE", "FORWARD", "DECODE", "TiledFp8Codec", "tiled_fp8_codec", "TILES", "FWD_TILES"]

FP8_KERNEL_DTYPES = ("float32", "float16", "bfloat16")
FP8_KERNEL_OPS = ("sum", "avg")
GROUP = 1 if SIMULATED else 32                 # lanes per FP8 block
ENCODE, REDUCE_ENCODE, FORWARD, DECODE = 0, 1, 2, 3
_STORAGE = {"float32": (np.float32, "f32"), "float16": (np.float16, "f16"), "bfloat16": (np.uint16, "bf16")}
TILES, FWD_TILES = 1, 4          # blocks a lane group codes per round: encode/hop, forward/decode (fp8_ring_tiles.py;
                                  # the H200 sweep in docs/fp8.md: 1:4 fastest of 0:1, 1:4, 2:4)
WARP = 0                          # quads per lane of the warp-tile path (fp8_ring_warps.py); 0: the lane groups


@dataclass(frozen=True)
class TiledFp8Codec(Codec):
    """The FP8 codec with the vector path's blocks per lane group and round (a compile-time choice, no bits)."""
    tiles: int = TILES
    fwd_tiles: int = FWD_TILES
    warp_steps: int = WARP
    prefetch: int = 0


def tiled_fp8_codec(fmt="e4m3", block=128, tiles=TILES, fwd_tiles=FWD_TILES, warp_steps=WARP, prefetch=0):
    """ring_kernel's FP8 codec with ``tiles`` (1, 2; 0 untiled) / ``fwd_tiles`` (>= 1) blocks per lane group on the
    vector path, or (``warp_steps`` 1, 2, 4; 0: lane groups) fp8_ring_warps.py's warp tiles of that many quads per lane;
    ``prefetch``: rounds ahead the lane groups ask L2 for (fp8_ring_tiles.py; 0: none, lane groups only)."""
    from ringlab.kernels.fp8_ring_tiles import check_prefetch
    from ringlab.kernels.fp8_ring_warps import WARP_STEPS
    tiles, fwd_tiles = check_int("tiles", tiles, 0, 2), check_int("fwd_tiles", fwd_tiles, 1, 8)
    warp_steps, prefetch = check_int("warp_steps", warp_steps, 0), check_prefetch(prefetch)
    if warp_steps not in (0,) + WARP_STEPS:
        raise ValueError(f"warp_steps must be 0 (lane groups) or one of {WARP_STEPS}, got {warp_steps}")
    if prefetch and (warp_steps or tiles == 0):
        raise ValueError(f"prefetch works on the lane-group tiles only (tiles 1 or 2, warp_steps 0), got prefetch "
                         f"{prefetch} with tiles {tiles}, warp_steps {warp_steps}")
    return TiledFp8Codec("fp8", fp8_format(fmt).name, check_block(block), tiles, fwd_tiles, warp_steps, prefetch)


def _block_part(lo, hi, block, k, nslices, p, nparts):
    """Blocks [ta, tb) (counted from lo) of part p in slice k: chunk_bounds' even split, over whole blocks."""
    n = (hi - lo + block - 1) // block
    q, r = n // nslices, n % nslices
    s0 = k * q + min(k, r)
    m = q + (1 if k < r else 0)
    q2, r2 = m // nparts, m % nparts
    a = s0 + p * q2 + min(p, r2)
    return a, a + q2 + (1 if p < r2 else 0)


block_part = device_fn(_block_part)


def _inlined(fn):
    """A device function inlined at numba's IR level: the local arrays it takes then stay in registers."""
    return cuda.jit(device=True)(fn) if SIMULATED else cuda.jit(device=True, inline="always")(fn)


def fp8_block_ops(dtype, op, fmt, block, group=GROUP):
    """Device functions for one FP8 block [e0, e1): ``move(mode, ...)``: ENCODE src, REDUCE_ENCODE src + D(left)
    (/N at avg's final), FORWARD the left's codes (and decode), DECODE; and its parts, for other kernels.
    ``group``: lanes per block (tests run the GPU's 32 in the simulator)."""
    name = check_fp8_input_dtype(dtype).name           # integers: the project's clear TypeError
    if op not in FP8_KERNEL_OPS:
        raise ValueError(f"FP8 all-reduce supports op sum or avg, got {op!r}")
    f, block = fp8_format(fmt), check_block(block)
    storage, kind = _STORAGE[name]
    load, store = pointer_access(storage)
    cload, cstore = pointer_access(np.uint8)
    sload, sstore = pointer_access(np.float32)
    widen, narrow = _widen(kind), _narrow(kind)
    enc, dec = make_fp8_value_codec(f, f32_bits, bits_f32, fmul_rn)
    enc, dec = device_fn(enc), device_fn(dec)
    per = block // group
    rcp_fmax, one, zero, inf = f.rcp_fmax32, np.float32(1.0), np.float32(0.0), np.float32(np.inf)
    divide = op == "avg"

    @_inlined
    def group_max(m):
        off = group >> 1
        while off > 0:
            m = shfl_xor_fmax(m, off)                  # amax is finite: fmax is max
            off = off >> 1
        return m

    @_inlined
    def load_values(v, src, e0, e1, t):
        """v[m] = element e0 + t + group*m of src in fp32 (0 past e1)."""
        for m in range(per):
            j = e0 + t + group * m
            v[m] = widen(load(src, j)) if j < e1 else zero

    @_inlined
    def add_decoded(v, lc, ls, e0, e1, slot, t):
        """v[m] += D(left's codes) in fp32: decoded * scale rounded, then added (no FMA)."""
        ps = np.float32(sload(ls, slot))
        for m in range(per):
            j = e0 + t + group * m
            if j < e1:
                v[m] = v[m] + fmul_rn(dec(np.int64(cload(lc, j))), ps)

    @_inlined
    def encode_store(v, mc, ms, out, e0, e1, slot, t, write_out):
        """Quantize the block v into our codes and scale slot; ``write_out``: also out = D(codes)."""
        amax = zero
        for m in range(per):
            a = abs(v[m])
            if a < inf and a > amax:                   # NaN and inf stay out of amax
                amax = a
        amax = group_max(amax)
        scale = fmul_rn(amax, rcp_fmax)
        if not scale >= MIN_SCALE:
            scale = one
        inv = one / scale
        if t == 0:
            sstore(ms, slot, scale)
        for m in range(per):
            j = e0 + t + group * m
            if j < e1:
                c = np.int64(enc(v[m], inv))
                cstore(mc, j, c)
                if write_out:
                    store(out, j, narrow(fmul_rn(dec(c), scale)))

    @_inlined
    def move(mode, src, out, lc, ls, mc, ms, e0, e1, slot, t, nranks, final):
        if mode >= FORWARD:                            # codes travel unchanged: decode them into out
            ps = np.float32(sload(ls, slot))
            if mode == FORWARD and t == 0:
                sstore(ms, slot, ps)
            for m in range(per):
                j = e0 + t + group * m
                if j < e1:
                    c = np.int64(cload(lc, j))
                    if mode == FORWARD:
                        cstore(mc, j, c)
                    store(out, j, narrow(fmul_rn(dec(c), ps)))
            return
        v = cuda.local.array(per, float32)
        load_values(v, src, e0, e1, t)
        if mode == REDUCE_ENCODE:
            add_decoded(v, lc, ls, e0, e1, slot, t)
            if divide and final:
                for m in range(per):
                    v[m] = v[m] / float32(nranks)
        encode_store(v, mc, ms, out, e0, e1, slot, t, final)
    return SimpleNamespace(move=move, load_values=load_values, add_decoded=add_decoded, encode_store=encode_store,
                           per=per, divide=divide)


def fp8_moves(dtype, op, codec):
    """(first, step) device functions of an FP8 codec for the ring walk (ring_kernel.py): primitive 0 encodes
    the first chunk; recv_* decode the left's send buffer, reduce in fp32 and re-encode into ours. A plain
    fp8_codec takes TILES / FWD_TILES; a TiledFp8Codec its own (tiles 0: move4 block by block, as before tiling)."""
    from ringlab.kernels.fp8_ring_quads import fp8_quad_ops
    from ringlab.kernels.fp8_ring_tiles import fp8_tile_ops
    block = check_block(codec.block)
    move = fp8_block_ops(dtype, op, codec.fmt, block).move
    from ringlab.kernels.fp8_ring_warps import fp8_warp_ops
    tiles, fwd_tiles = getattr(codec, "tiles", TILES), getattr(codec, "fwd_tiles", FWD_TILES)
    warp_steps = getattr(codec, "warp_steps", WARP)
    legacy = tiles == 0 and warp_steps == 0
    if warp_steps:
        run = fp8_warp_ops(dtype, op, codec.fmt, block, warp_steps).run
    else:
        run = fp8_tile_ops(dtype, op, codec.fmt, block, max(tiles, 1), fwd_tiles,
                           prefetch=getattr(codec, "prefetch", 0)).run
    quad = fp8_quad_ops(dtype, op, codec.fmt, block)
    move4, lanes = quad.move4, quad.lanes
    per_warp = GROUP // lanes

    @cuda.jit(device=True)
    def blocks(mode, src, out, lc, ls, mc, ms, lo, hi, chunk, nbc, k, nslices, p, nparts, lane, nlanes, nranks,
               final, aligned):
        ta, tb = block_part(lo, hi, block, k, nslices, p, nparts)
        groups = max(nlanes // GROUP, 1)
        if aligned and lo % 4 == 0 and not legacy:     # quads: a warp-uniform loop, every lane in the shuffles
            run(mode, src, out, lc, ls, mc, ms, lo, hi, ta, tb, chunk * nbc, lane, nlanes, nranks, final)
            return
        if aligned and lo % 4 == 0:
            wl = lane % GROUP
            gw = ta + (lane // GROUP) * per_warp
            while gw < tb:
                g = gw + wl // lanes
                e0 = lo + g * block
                move4(mode, src, out, lc, ls, mc, ms, e0, min(e0 + block, hi), chunk * nbc + g, wl % lanes, nranks,
                      final, g < tb)
                gw += groups * per_warp
            return
        t = lane % GROUP
        g = ta + lane // GROUP
        while g < tb:
            e0 = lo + g * block
            move(mode, src, out, lc, ls, mc, ms, e0, min(e0 + block, hi), chunk * nbc + g, t, nranks, final)
            g += groups

    @cuda.jit(device=True)
    def first(src, mc, ms, lo, hi, chunk, nbc, k, nslices, p, nparts, lane, nlanes, aligned):
        blocks(ENCODE, src, src, mc, ms, mc, ms, lo, hi, chunk, nbc, k, nslices, p, nparts, lane, nlanes, 1, False,
               aligned)

    @cuda.jit(device=True)
    def step(src, out, peer, mc, ms, lc, ls, nbc, lo, hi, chunk, bits, last, k, nslices, p, nparts, lane, nlanes,
             nranks, aligned):
        """recv_reduce_send / recv_reduce_copy_send (FINAL: also out), recv_copy_send (forward), recv (last)."""
        final = (bits & FINAL) != 0
        if bits & REDUCE:
            mode = REDUCE_ENCODE
        elif last:
            mode = DECODE
        else:
            mode = FORWARD
        blocks(mode, src, out, lc, ls, mc, ms, lo, hi, chunk, nbc, k, nslices, p, nparts, lane, nlanes, nranks,
               final, aligned)

    return SimpleNamespace(first=first, step=step, has_first=True, uses_codec_columns=True)
