"""numba-CUDA FP8 kernels: block-scaled quantize, dequantize, and the fused compressed-hop kernels.

Same policy and bit-for-bit the same results as kernels/reference.py (see its docstring).

Memory-bound design (no shared memory, no __syncthreads on the GPU):

- a warp owns a tile of ``32 * steps`` element pairs (``fp8_access``: one 8-byte fp32-pair load per lane
  per step, coalesced); tiles start on FP8-block boundaries, so every FP8 block lies inside one warp:
  block <= 64 elements = a segment of block/2 lanes of one step, 128/256 = 2/4 whole steps;
- block amax: |x| of the lane's two finite elements, the max over the block's steps, then xor-shuffle
  max over the segment (log2 lanes steps); every lane of the segment then has the amax, computes
  scale = amax * fp32(1/fmax) and inv = 1/scale (once per lane per FP8 block, not per element),
  and encodes its elements as RNE(clamp(x * inv)): on sm_89+ by the GPU's conversion instruction
  (``cvt.rn.satfinite.e4m3x2.f32``, two values per instruction; NaN/inf by the policy), elsewhere and
  in the simulator by fp32 arithmetic plus a few integer ops (``fp8_bits.make_fp8_value_codec``);
  two codes go out as one uint16 store;
- a grid-stride loop over tiles, ``blocks_per_sm`` CUDA blocks per SM (TUNING), loads of all steps
  issued before any store so several are in flight per lane.

``dequant_add_requant`` is one compressed reduce-scatter hop: it reads the peer's codes and scales
and the local partial sum once, and writes the new codes and scales once (plus, at the last hop,
the owner's dequantized result); the IPC ring (collectives/fp8_ipc.py) points it at peer memory directly.
Multiplies whose result is added (decode * scale in the hop) use ``fmul_rn``: NVVM would otherwise
fuse them into an FMA (one rounding instead of NumPy's two).
"""
import numpy as np
from numba import float32

from .device import (SIMULATED, cuda, data_address, device_fn, fmul_rn, fp8x2_converter, fp8x2_decoder, hardware_fp8,
                     kernel_view, launch, shfl_xor_max, sm_count, bits_f32, f32_bits)
from .formats import check_block, fp8_format
from .fp8_access import code_pair_loader, code_pair_storer, pair_loader, pair_storer, word_dtype
from .fp8_bits import make_fp8_value_codec
from .reference import MIN_SCALE, split_fp8_message

__all__ = ["quantize_device", "dequantize_device", "dequant_add_requant_device", "dequant_accumulate_device",
           "TUNING", "VARIANTS"]

# Launch shape; device_kernels_check.py times every entry of VARIANTS and the lead keeps the fastest.
# blocks_per_sm 0 = one tile per warp (a grid as large as the data, no grid-stride loop).
# Per kernel: the fastest VARIANTS entry measured on an H100 (docs/results/fp8/kernels_speed_gpu.json).
TUNING = {"quantize": {"tpb": 256, "steps": 8, "blocks_per_sm": 4, "words": False},
          "hop": {"tpb": 256, "steps": 4, "blocks_per_sm": 0},
          "dequantize": {"tpb": 256, "steps": 4, "blocks_per_sm": 0},
          "accumulate": {"tpb": 256, "steps": 4, "blocks_per_sm": 8}}
# "-sw": the software encoder even where the GPU has the FP8 conversion instruction (hardware_fp8()).
# "-el": fp32/bf16 values as single elements (4-byte accesses), not two-element words.
VARIANTS = {"s4-b8-sw": dict(steps=4, blocks_per_sm=8, hw=False), "s4-full-sw": dict(steps=4, blocks_per_sm=0, hw=False),
            "s2-full": dict(steps=2, blocks_per_sm=0), "s4-full": dict(steps=4, blocks_per_sm=0),
            "s2-b16": dict(steps=2, blocks_per_sm=16), "s4-b8": dict(steps=4, blocks_per_sm=8),
            "s8-b4": dict(steps=8, blocks_per_sm=4),
            "s4-b8-el": dict(steps=4, blocks_per_sm=8, words=False), "s4-full-el": dict(steps=4, blocks_per_sm=0, words=False),
            "s8-b4-el": dict(steps=8, blocks_per_sm=4, words=False)}
_kernels = {}


def _codec(f, hw=False):
    """Device functions for one format: encode_pair(a, b, inv), dequant_pair(c0, c1, scale), scale_of(amax),
    finite_abs(v). ``hw``: finite values are encoded by the GPU's fp32 -> FP8 conversion instruction
    (device.fp8x2_converter), NaN/inf by the policy, and codes decoded by FP8 -> f16x2 -> f32
    (device.fp8x2_decoder); else the software codec (fp8_bits.py) does both."""
    encode, decode_value = make_fp8_value_codec(f, f32_bits, bits_f32, fmul_rn)
    encode, decode_value = device_fn(encode), device_fn(decode_value)
    rcp_fmax, one, inf = f.rcp_fmax32, np.float32(1.0), np.float32(np.inf)
    zero = np.float32(0.0)
    has_inf, inf_code, nan_code = f.has_inf, f.inf_code, f.nan_code

    def dequant(code, scale):
        return fmul_rn(decode_value(code), scale)
    dequant = device_fn(dequant)

    def scale_of(amax):
        s = fmul_rn(amax, rcp_fmax)
        return one if s < MIN_SCALE else s

    def finite_abs(v):
        a = abs(v)
        return a if a < inf else zero           # NaN and inf: left out of amax

    if hw:
        cvt = fp8x2_converter(f.name)

        def special(v):
            """Code of a NaN or inf input (docs/fp8.md policy)."""
            b = f32_bits(v)
            if has_inf and (b & 0x7FFFFF) == 0:
                return ((b >> 24) & 0x80) | inf_code
            return nan_code
        special = device_fn(special)

        def encode_pair(a, b, inv):
            w = np.int64(cvt(fmul_rn(a, inv), fmul_rn(b, inv)))
            c0, c1 = w & 0xFF, w >> 8
            if not abs(a) < inf:                 # NaN or inf: one float compare on the common path
                c0 = special(a)
            if not abs(b) < inf:
                c1 = special(b)
            return c0, c1

        dec = fp8x2_decoder(f.name)

        def dequant_pair(c0, c1, scale):
            a, b = dec(c0, c1)
            return fmul_rn(a, scale), fmul_rn(b, scale)
    else:
        def encode_pair(a, b, inv):
            return encode(a, inv), encode(b, inv)

        def dequant_pair(c0, c1, scale):
            return dequant(c0, scale), dequant(c1, scale)
    return device_fn(encode_pair), device_fn(dequant_pair), device_fn(scale_of), device_fn(finite_abs)


def _log2(v):
    return int(v).bit_length() - 1


def _make_quantizing_kernel(fmt, block, kin, win, kout, wout, wcodes, wpeer, steps, tpb, hw, hop):
    """quantize(x) when ``hop`` is False, else dequant-add-requant: the same warp tiles around a different value."""
    encode_pair, dequant_pair, scale_of, finite_abs = _codec(fp8_format(fmt), hw)
    load, store = pair_loader(kin, win), pair_storer(kout, wout)
    load_codes, store_codes = code_pair_loader(wpeer), code_pair_storer(wcodes)
    half_block = block // 2                      # pairs per FP8 block
    hb_shift, hb_mask = _log2(half_block), half_block - 1
    span = max(1, block // 64)                   # steps per FP8 block
    nsteps = max(steps, span)
    seg_top = min(half_block, 32) // 2           # first xor offset inside a step
    tile_pairs = 32 * nsteps
    warps_per_block = tpb // 32
    one = np.float32(1.0)

    def kernel(x, xw, pc, pcw, ps, codes, codes_w, scales, out, out_w, n, div, div_mode, write_out):
        lane = cuda.threadIdx.x & 31
        warp = cuda.blockIdx.x * warps_per_block + (cuda.threadIdx.x >> 5)
        nwarps = cuda.gridDim.x * warps_per_block
        npairs = (n + 1) >> 1
        ntiles = (npairs + tile_pairs - 1) // tile_pairs
        rounds = (ntiles + nwarps - 1) // nwarps         # the same for every thread: shuffles stay uniform
        va = cuda.local.array(nsteps, float32)
        vb = cuda.local.array(nsteps, float32)
        am = cuda.local.array(nsteps, float32)      # block amax, then the block's scale
        iv = cuda.local.array(nsteps, float32)      # 1 / scale
        for r in range(rounds):
            tile = r * nwarps + warp
            p0 = tile * tile_pairs + lane
            full = (tile + 1) * tile_pairs <= (n >> 1)  # warp-uniform: the whole tile is in the word range
            for j in range(nsteps):
                p = p0 + 32 * j
                a, b = load(x, xw, p, n, full)
                if hop:
                    c0, c1 = load_codes(pc, pcw, p, n, full)
                    sc = one
                    if full or p < npairs:
                        sc = ps[p >> hb_shift]
                    da, db = dequant_pair(c0, c1, sc)
                    a = a + da
                    b = b + db
                    if div_mode == 1:
                        a = a / div
                        b = b / div
                    elif div_mode == 2:                  # power of two: the exact reciprocal, same bits
                        a = fmul_rn(a, div)
                        b = fmul_rn(b, div)
                va[j] = a
                vb[j] = b
                fa, fb = finite_abs(a), finite_abs(b)
                am[j] = fa if fa > fb else fb
            for g in range(nsteps // span):              # amax of each FP8 block, on all its lanes
                m = am[g * span]
                for k in range(1, span):
                    other = am[g * span + k]
                    m = other if other > m else m
                off = seg_top
                while off > 0:
                    m = shfl_xor_max(m, off)
                    off = off >> 1
                scale = scale_of(m)
                inv = one / scale                        # once per FP8 block and lane, not per step
                for k in range(span):
                    am[g * span + k] = scale
                    iv[g * span + k] = inv
            for j in range(nsteps):
                p = p0 + 32 * j
                scale, inv = am[j], iv[j]
                c0, c1 = encode_pair(va[j], vb[j], inv)
                store_codes(codes, codes_w, p, n, full, c0, c1)
                if (p & hb_mask) == 0 and (full or p < npairs):
                    scales[p >> hb_shift] = scale
                if write_out:
                    oa, ob = dequant_pair(c0, c1, scale)
                    store(out, out_w, p, n, full, oa, ob)
    return cuda.jit(kernel), tile_pairs


def _make_elementwise_kernel(fmt, block, kout, wout, wcodes, steps, hw, accumulate):
    """dequantize into out (``accumulate`` False) or add the dequantized values into an fp32 accumulator."""
    _, dequant_pair, _, _ = _codec(fp8_format(fmt), hw)
    load, store = pair_loader(kout, wout), pair_storer(kout, wout)
    load_codes = code_pair_loader(wcodes)
    hb_shift = _log2(block // 2)
    one = np.float32(1.0)

    def kernel(codes, codes_w, scales, out, out_w, n):
        stride = cuda.gridDim.x * cuda.blockDim.x
        npairs = (n + 1) >> 1
        ca = cuda.local.array(steps, np.int64)
        cb = cuda.local.array(steps, np.int64)
        sc = cuda.local.array(steps, float32)
        va = cuda.local.array(steps, float32)
        vb = cuda.local.array(steps, float32)
        p0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while p0 < npairs:
            full = p0 + (steps - 1) * stride < (n >> 1)  # all of this lane's pairs are in the word range
            for j in range(steps):                       # all loads first: several in flight per lane
                p = p0 + j * stride
                c0, c1 = load_codes(codes, codes_w, p, n, full)
                ca[j] = c0
                cb[j] = c1
                s = one
                if full or p < npairs:
                    s = scales[p >> hb_shift]
                sc[j] = s
                if accumulate:
                    a, b = load(out, out_w, p, n, full)
                    va[j] = a
                    vb[j] = b
            for j in range(steps):
                p = p0 + j * stride
                a, b = dequant_pair(ca[j], cb[j], sc[j])
                if accumulate:
                    a = va[j] + a
                    b = vb[j] + b
                store(out, out_w, p, n, full, a, b)
            p0 += steps * stride
    return cuda.jit(kernel), steps


def _kernel(name, *key):
    full = (name,) + key
    if full not in _kernels:
        if name in ("quantize", "hop"):
            _kernels[full] = _make_quantizing_kernel(*key, hop=name == "hop")
        else:
            _kernels[full] = _make_elementwise_kernel(*key, accumulate=name == "accumulate")
    return _kernels[full]


def _tuning(variant, kernel):
    t = dict(TUNING[kernel])
    if variant is not None:
        t.update(VARIANTS[variant] if isinstance(variant, str) else variant)
    t["hw"] = bool(t.get("hw", True)) and hardware_fp8()
    t["words"] = bool(t.get("words", True))
    return t


def _grid(units, per_block, t):
    """CUDA blocks: cover ``units`` once, capped at blocks_per_sm per SM (0: no cap)."""
    need = max(1, -(-units // per_block))
    return need if t["blocks_per_sm"] <= 0 else max(1, min(need, sm_count() * t["blocks_per_sm"]))


def _words(a, kind, n, use=True):
    """(word view of a's first n // 2 pairs, True) when a is aligned for words, else (a[:0], False).

    The unused view is an empty slice, not ``a`` itself: the simulator copies every argument back after
    the launch, and a second, unmodified copy of ``a`` would overwrite what the kernel wrote.
    """
    wdt = word_dtype(kind)
    if not use or wdt is None or n < 2 or data_address(a) % np.dtype(wdt).itemsize:
        return a[:0], False
    return a[: n - (n & 1)].view(wdt), True


def _divide_mode(divide_by):
    """(mode, operand): 0 no-op for 1, 2 multiply by an exact power-of-two reciprocal, 1 divide."""
    d = np.float32(divide_by)
    if d == 1:
        return 0, d
    m, e = np.frexp(d)
    if m == 0.5 and -126 < e - 1 < 127:
        return 2, np.float32(1.0) / d
    return 1, d


def _fp8_kind(a, what):
    v, kind = kernel_view(a.reshape(-1))
    if kind not in ("f32", "f16", "bf16"):
        raise TypeError(f"{what}: FP8 kernels take float32, float16 or bfloat16, got {a.dtype}")
    return v, kind


def _check(codes, scales, n, block):
    if codes.size != n or scales.size != -(-n // block):
        raise ValueError(f"{n} elements with block {block} need {n} codes and {-(-n // block)} scales, "
                         f"got {codes.size} and {scales.size}")


def quantize_device(x, codes, scales, fmt="e4m3", block=128, variant=None):
    """codes, scales = quantize(x) on the device (same bits as ``quantize_fp8_blockwise``)."""
    f, block = fp8_format(fmt), check_block(block)
    xv, kind = _fp8_kind(x, "quantize")
    n = xv.size
    _check(codes, scales, n, block)
    if n:
        t = _tuning(variant, "quantize")
        xw, wx = _words(xv, kind, n, t["words"])
        cw, wc = _words(codes, "u8", n)
        kern, tile = _kernel("quantize", f.name, block, kind, wx, kind, wx, wc, wc, t["steps"], t["tpb"], t["hw"])
        launch(kern, _grid(-(-n // 2), tile * t["tpb"] // 32, t), t["tpb"],    # no peer, no out: empty placeholders
               xv, xw, codes[:0], cw[:0], scales[:0], codes, cw, scales, xv[:0], xw[:0], n, np.float32(1), 0, False)
    return codes, scales


def dequantize_device(codes, scales, out, fmt="e4m3", block=128, variant=None):
    """out = dequantize(codes, scales) on the device, cast to out's dtype (fp32, fp16, bf16)."""
    return _elementwise("dequantize", codes, scales, out, fmt, block, variant)


def dequant_add_requant_device(local, peer_codes, peer_scales, codes, scales, fmt="e4m3", block=128,
                               out=None, divide_by=1, variant=None):
    """One compressed hop: s = (local + dequantize(peer)) / divide_by; codes, scales = quantize(s).

    With ``out`` (same dtype as ``local``) also writes dequantize(codes, scales) there.
    """
    f, block = fp8_format(fmt), check_block(block)
    lv, kind = _fp8_kind(local, "dequant_add_requant")
    n = lv.size
    _check(peer_codes, peer_scales, n, block)
    _check(codes, scales, n, block)
    ov, kind_out = (lv[:0], kind) if out is None else _fp8_kind(out, "dequant_add_requant out")
    if out is not None and ov.size != n:
        raise ValueError(f"out has {ov.size} elements, local has {n}")
    if n:
        t = _tuning(variant, "hop")
        lw, wl = _words(lv, kind, n, t["words"])
        ow, wo = _words(ov, kind_out, n, t["words"])
        pw, wp = _words(peer_codes, "u8", n)
        cw, wc = _words(codes, "u8", n)
        mode, d = _divide_mode(divide_by)
        kern, tile = _kernel("hop", f.name, block, kind, wl, kind_out, wo, wc, wp, t["steps"], t["tpb"], t["hw"])
        launch(kern, _grid(-(-n // 2), tile * t["tpb"] // 32, t), t["tpb"],
               lv, lw, peer_codes, pw, peer_scales, codes, cw, scales, ov, ow, n, d, mode, out is not None)
    return codes, scales


def dequant_accumulate_device(acc, codes, scales, fmt="e4m3", block=128, variant=None):
    """acc (fp32) += dequantize(codes, scales) on the device: the direct reduce-scatter's owner step."""
    if acc.dtype != np.float32:
        raise TypeError(f"the accumulator must be float32, got {acc.dtype}")
    _elementwise("accumulate", codes, scales, acc.reshape(-1), fmt, block, variant)
    return acc


def _elementwise(name, codes, scales, out, fmt, block, variant):
    f, block = fp8_format(fmt), check_block(block)
    ov, kind = _fp8_kind(out, name)
    n = ov.size
    _check(codes, scales, n, block)
    if n:
        t = _tuning(variant, name)
        ow, wo = _words(ov, kind, n, t["words"])
        cw, wc = _words(codes, "u8", n)
        kern, steps = _kernel(name, f.name, block, kind, wo, wc, t["steps"], t["hw"])
        launch(kern, _grid(-(-n // 2), t["tpb"] * steps, t), t["tpb"], codes, cw, scales, ov, ow, n)
    return out


def message_views(msg, count, block):
    """(codes, scales) views of one chunk's message buffer, as the kernels take them."""
    return split_fp8_message(msg, count, block)
