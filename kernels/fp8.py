"""numba-CUDA FP8 kernels: block-scaled quantize, dequantize, and the fused compressed-hop kernels."""
# Same policy and bit-for-bit the same results as kernels/reference.py (see its docstring).
#
# Memory-bound design (no shared memory, no __syncthreads on the GPU): the budget at HBM speed is a few
# dozen instructions per element, so the kernels spend it on the data, not on indexing:
#
# - a lane moves a *quad* of four consecutive elements per step (``fp8_access``: one 16-byte fp32
#   vector load, one 4-byte store of four codes); a warp owns a tile of ``32 * steps`` quads starting on
#   an FP8-block boundary, so every FP8 block lies inside one warp: block 32/64 = 8/16 lanes of a step,
#   128 = one whole step, 256 = two steps;
# - block amax: ``max.f32`` over the quad's |values| (it skips NaN by itself), the max over the block's
#   steps, then xor shuffles over the block's lanes; inf is left out of amax by a second pass that runs
#   only when a warp vote finds one. Every lane of the block then has amax, computes scale and
#   inv = 1/scale once per block, and encodes its quad as RNE(clamp(x * inv)): on sm_89+ by the GPU's
#   conversion instruction (``cvt.rn.satfinite.e4m3x2.f32``, two values per instruction; NaN/inf patched
#   to the policy's codes in a branch taken only when the quad holds one), elsewhere and in the simulator
#   by fp32 arithmetic plus a few integer ops (``fp8_bits.make_fp8_value_codec``);
# - a grid-stride loop over tiles, ``blocks_per_sm`` CUDA blocks per SM (TUNING), all of a tile's loads
#   issued before its first store so several are in flight per lane; a tile wholly inside the array
#   takes the unchecked path (a warp-uniform flag), only the last partial tile checks bounds.
#
# ``dequant_add_requant`` is one compressed reduce-scatter hop: it reads the peer's codes and scales
# and the local partial sum once, and writes the new codes and scales once (plus, at the last hop,
# the owner's dequantized result); the IPC ring (collectives/gpu/fp8_ipc.py) points it at peer memory directly.
# Multiplies whose result is added (decode * scale in the hop) use ``fmul_rn``: NVVM would otherwise
# fuse them into an FMA (one rounding instead of NumPy's two).

import numpy as np
from numba import float32

from ringlab.kernels.device import cuda, device_fn, fmul_rn, hardware_fp8, kernel_view, launch, sm_count, f32_bits, bits_f32
from ringlab.kernels.formats import check_block, fp8_format
from ringlab.kernels.fp8_access import code_quad_loader, code_quad_storer, quad_loader, quad_storer
from ringlab.kernels.fp8_bits import make_fp8_value_codec
from ringlab.kernels.intrinsics import aligned4, any_lane, fmax_nan_ignoring, fp8x4_decoder, fp8x4_encoder, shfl_xor_fmax
from ringlab.kernels.reference import MIN_SCALE, split_fp8_message

__all__ = ["quantize_device", "dequantize_device", "dequant_add_requant_device", "dequant_accumulate_device",
           "TUNING", "VARIANTS"]

# Launch shape; device_kernels_check.py times every entry of VARIANTS and the lead keeps the fastest.
# steps: quads per lane per tile; blocks_per_sm 0 = one tile per warp (a grid as large as the data).
# Per kernel: the fastest VARIANTS entry on an H200 (docs/results/fp8/kernels_speed_h200.json).
TUNING = {"quantize": {"tpb": 256, "steps": 4, "blocks_per_sm": 0},
          "hop": {"tpb": 256, "steps": 4, "blocks_per_sm": 0},
          "dequantize": {"tpb": 256, "steps": 2, "blocks_per_sm": 0},
          "accumulate": {"tpb": 256, "steps": 1, "blocks_per_sm": 0}}
# "-sw": the software encoder even where the GPU has the FP8 conversion instruction (hardware_fp8()).
# "-el": four scalar accesses per quad (the path of arrays not aligned for vectors), not one vector access.
VARIANTS = {"s1-full": dict(steps=1, blocks_per_sm=0), "s2-full": dict(steps=2, blocks_per_sm=0),
            "s4-full": dict(steps=4, blocks_per_sm=0), "s2-b8": dict(steps=2, blocks_per_sm=8),
            "s4-b4": dict(steps=4, blocks_per_sm=4), "s4-b8": dict(steps=4, blocks_per_sm=8),
            "s2-full-el": dict(steps=2, blocks_per_sm=0, vector=False),
            "s2-full-sw": dict(steps=2, blocks_per_sm=0, hw=False)}
_kernels = {}


def _codec(f, hw=False):
    """Device functions for one format, four values at a time: encode4(a, b, c, d, inv) -> int64 word of
    codes (a in the low byte), decode4(word, scale) -> 4 x fp32, scale_of(amax), finite_abs(v).
    ``hw``: the GPU's FP8 conversion instructions (intrinsics.fp8x4_encoder/decoder), NaN/inf patched to
    the policy's codes; else the software codec (fp8_bits.py) for each value."""
    encode, decode_value = make_fp8_value_codec(f, f32_bits, bits_f32, fmul_rn)
    encode, decode_value = device_fn(encode), device_fn(decode_value)
    rcp_fmax, one, inf = f.rcp_fmax32, np.float32(1.0), np.float32(np.inf)
    zero = np.float32(0.0)

    def scale_of(amax):
        s = fmul_rn(amax, rcp_fmax)
        return s if s >= MIN_SCALE else one     # also a NaN amax (a block of NaN only): scale 1

    def finite_abs(v):
        a = abs(v)
        return a if a < inf else zero           # NaN and inf: left out of amax

    if hw:
        cvt4, dec4 = fp8x4_encoder(f.name), fp8x4_decoder(f.name)

        def with_policy(w, k, v, inv):
            """Word ``w`` with code k replaced by the policy's code for v (finite: unchanged)."""
            if abs(v) < inf:
                return w
            shift = 8 * k
            return (w & ~(np.int64(0xFF) << shift)) | (encode(v, inv) << shift)
        with_policy = device_fn(with_policy)

        def encode4(a, b, c, d, inv):
            w = np.int64(cvt4(fmul_rn(a, inv), fmul_rn(b, inv), fmul_rn(c, inv), fmul_rn(d, inv)))
            if not ((abs(a) < inf) & (abs(b) < inf) & (abs(c) < inf) & (abs(d) < inf)):   # rare: NaN/inf
                w = with_policy(with_policy(with_policy(with_policy(w, 0, a, inv), 1, b, inv), 2, c, inv), 3, d, inv)
            return w

        def decode4(w, scale):
            a, b, c, d = dec4(w)
            return fmul_rn(a, scale), fmul_rn(b, scale), fmul_rn(c, scale), fmul_rn(d, scale)
    else:
        def encode4(a, b, c, d, inv):
            return encode(a, inv) | (encode(b, inv) << 8) | (encode(c, inv) << 16) | (encode(d, inv) << 24)

        def decode4(w, scale):
            return (fmul_rn(decode_value(w & 0xFF), scale), fmul_rn(decode_value((w >> 8) & 0xFF), scale),
                    fmul_rn(decode_value((w >> 16) & 0xFF), scale), fmul_rn(decode_value((w >> 24) & 0xFF), scale))
    return device_fn(encode4), device_fn(decode4), device_fn(scale_of), device_fn(finite_abs)


def _log2(v):
    return int(v).bit_length() - 1


def _make_quantizing_kernel(fmt, block, kin, kout, vector, steps, tpb, hw, hop):
    """quantize(x) when ``hop`` is False, else dequant-add-requant: the same warp tiles around a different value."""
    encode4, decode4, scale_of, finite_abs = _codec(fp8_format(fmt), hw)
    load, load_tail = quad_loader(kin, vector)
    store, store_tail = quad_storer(kout, vector)
    load_codes, load_codes_tail = code_quad_loader(vector)
    store_codes, store_codes_tail = code_quad_storer(vector)
    quads_per_block = block // 4
    qb_shift, qb_mask = _log2(quads_per_block), quads_per_block - 1
    span = max(1, quads_per_block // 32)         # steps per FP8 block
    nsteps = max(steps, span)
    seg_top = min(quads_per_block, 32) // 2      # first xor offset: the block's lanes within a step
    tile_quads = 32 * nsteps
    warps_per_block = tpb // 32
    one, inf = np.float32(1.0), np.float32(np.inf)

    def kernel(x, pc, ps, codes, scales, out, n, div, div_mode, write_out):
        lane = cuda.threadIdx.x & 31
        warp = cuda.blockIdx.x * warps_per_block + (cuda.threadIdx.x >> 5)
        nwarps = cuda.gridDim.x * warps_per_block
        ntiles = (n + 4 * tile_quads - 1) // (4 * tile_quads)
        rounds = (ntiles + nwarps - 1) // nwarps         # the same for every thread: shuffles stay uniform
        va = cuda.local.array(nsteps, float32)
        vb = cuda.local.array(nsteps, float32)
        vc = cuda.local.array(nsteps, float32)
        vd = cuda.local.array(nsteps, float32)
        am = cuda.local.array(nsteps, float32)      # peer scale, lane amax, then the block's scale
        iv = cuda.local.array(nsteps, float32)      # 1 / scale
        wq = cuda.local.array(nsteps, np.int64)     # peer codes, then the new codes
        for r in range(rounds):
            tile = r * nwarps + warp
            q0 = tile * tile_quads + lane
            full = (tile + 1) * tile_quads * 4 <= n      # warp-uniform: no bounds checks in this tile
            if full:                                     # every load of the tile before any use
                for j in range(nsteps):
                    q = q0 + 32 * j
                    va[j], vb[j], vc[j], vd[j] = load(x, q)
                    if hop:
                        wq[j] = load_codes(pc, q)
                        am[j] = ps[q >> qb_shift]
            else:
                for j in range(nsteps):
                    q = q0 + 32 * j
                    va[j], vb[j], vc[j], vd[j] = load_tail(x, q, n)
                    if hop:
                        wq[j] = load_codes_tail(pc, q, n)
                        am[j] = ps[q >> qb_shift] if 4 * q < n else one
            has_inf = False
            for j in range(nsteps):
                a, b, c, d = va[j], vb[j], vc[j], vd[j]
                if hop:
                    da, db, dc, dd = decode4(wq[j], am[j])
                    a, b, c, d = a + da, b + db, c + dc, d + dd
                    if div_mode == 1:
                        a, b, c, d = a / div, b / div, c / div, d / div
                    elif div_mode == 2:                  # power of two: the exact reciprocal, same bits
                        a, b, c, d = fmul_rn(a, div), fmul_rn(b, div), fmul_rn(c, div), fmul_rn(d, div)
                    va[j], vb[j], vc[j], vd[j] = a, b, c, d
                m = fmax_nan_ignoring(fmax_nan_ignoring(abs(a), abs(b)), fmax_nan_ignoring(abs(c), abs(d)))
                has_inf = has_inf | (m == inf)
                am[j] = m
            if any_lane(has_inf):                        # rare: amax over the finite values only
                for j in range(nsteps):
                    am[j] = max(max(finite_abs(va[j]), finite_abs(vb[j])), max(finite_abs(vc[j]), finite_abs(vd[j])))
            for g in range(nsteps // span):              # amax of each FP8 block, on all its lanes
                m = am[g * span]
                for k in range(1, span):
                    m = fmax_nan_ignoring(m, am[g * span + k])
                off = seg_top
                while off > 0:
                    m = shfl_xor_fmax(m, off)
                    off = off >> 1
                scale = scale_of(m)
                inv = one / scale                        # once per FP8 block and lane
                for k in range(span):
                    am[g * span + k] = scale
                    iv[g * span + k] = inv
            for j in range(nsteps):
                wq[j] = encode4(va[j], vb[j], vc[j], vd[j], iv[j])
                if write_out:
                    va[j], vb[j], vc[j], vd[j] = decode4(wq[j], am[j])
            if full:
                for j in range(nsteps):
                    q = q0 + 32 * j
                    store_codes(codes, q, wq[j])
                    if (q & qb_mask) == 0:
                        scales[q >> qb_shift] = am[j]
                    if write_out:
                        store(out, q, va[j], vb[j], vc[j], vd[j])
            else:
                for j in range(nsteps):
                    q = q0 + 32 * j
                    store_codes_tail(codes, q, n, wq[j])
                    if (q & qb_mask) == 0 and 4 * q < n:
                        scales[q >> qb_shift] = am[j]
                    if write_out:
                        store_tail(out, q, n, va[j], vb[j], vc[j], vd[j])
    return cuda.jit(kernel), tile_quads


def _make_elementwise_kernel(fmt, block, kout, vector, steps, hw, accumulate):
    """dequantize into out (``accumulate`` False) or add the dequantized values into an fp32 accumulator."""
    _, decode4, _, _ = _codec(fp8_format(fmt), hw)
    load, load_tail = quad_loader(kout, vector)
    store, store_tail = quad_storer(kout, vector)
    load_codes, load_codes_tail = code_quad_loader(vector)
    qb_shift = _log2(block // 4)
    one, zero = np.float32(1.0), np.float32(0.0)

    def kernel(codes, scales, out, n):
        stride = cuda.gridDim.x * cuda.blockDim.x
        nquads = (n + 3) >> 2
        wq = cuda.local.array(steps, np.int64)
        sc = cuda.local.array(steps, float32)
        va = cuda.local.array(steps, float32)
        vb = cuda.local.array(steps, float32)
        vc = cuda.local.array(steps, float32)
        vd = cuda.local.array(steps, float32)
        q0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while q0 < nquads:
            full = 4 * (q0 + (steps - 1) * stride) + 4 <= n     # all of this lane's quads are whole
            if full:                                     # all loads first: several in flight per lane
                for j in range(steps):
                    q = q0 + j * stride
                    wq[j] = load_codes(codes, q)
                    sc[j] = scales[q >> qb_shift]
                    if accumulate:
                        va[j], vb[j], vc[j], vd[j] = load(out, q)
            else:
                for j in range(steps):
                    q = q0 + j * stride
                    wq[j], sc[j] = np.int64(0), one
                    va[j], vb[j], vc[j], vd[j] = zero, zero, zero, zero
                    if 4 * q < n:
                        wq[j] = load_codes_tail(codes, q, n)
                        sc[j] = scales[q >> qb_shift]
                        if accumulate:
                            va[j], vb[j], vc[j], vd[j] = load_tail(out, q, n)
            for j in range(steps):
                a, b, c, d = decode4(wq[j], sc[j])
                if accumulate:
                    a, b, c, d = va[j] + a, vb[j] + b, vc[j] + c, vd[j] + d
                va[j], vb[j], vc[j], vd[j] = a, b, c, d
            if full:
                for j in range(steps):
                    store(out, q0 + j * stride, va[j], vb[j], vc[j], vd[j])
            else:
                for j in range(steps):
                    q = q0 + j * stride
                    if 4 * q < n:
                        store_tail(out, q, n, va[j], vb[j], vc[j], vd[j])
            q0 += steps * stride
    return cuda.jit(kernel), steps


def _kernel(name, *key):
    full = (name,) + key
    if full not in _kernels:
        if name in ("quantize", "hop"):
            _kernels[full] = _make_quantizing_kernel(*key, hop=name == "hop")
        else:
            _kernels[full] = _make_elementwise_kernel(*key, accumulate=name == "accumulate")
    return _kernels[full]


def _tuning(variant, kernel, *arrays):
    """Launch shape for ``kernel`` (TUNING, overridden by a VARIANTS name or dict); ``vector`` only when
    every array the kernel touches is aligned for quads."""
    t = dict(TUNING[kernel])
    if variant is not None:
        t.update(VARIANTS[variant] if isinstance(variant, str) else variant)
    t["hw"] = bool(t.get("hw", True)) and hardware_fp8()
    t["vector"] = bool(t.get("vector", True)) and all(aligned4(a) for a in arrays if a.size)
    return t


def _grid(units, per_block, t):
    """CUDA blocks: cover ``units`` once, capped at blocks_per_sm per SM (0: no cap)."""
    need = max(1, -(-units // per_block))
    return need if t["blocks_per_sm"] <= 0 else max(1, min(need, sm_count() * t["blocks_per_sm"]))


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


def _launch_quantizing(name, fmt, block, variant, x, kind, peer_codes, peer_scales, codes, scales, out, kind_out,
                       divide_by):
    """quantize / hop launch; unused arrays are empty slices (the simulator copies every argument back
    after a launch, so a second, unmodified copy of a written array would overwrite what the kernel wrote)."""
    n = x.size
    t = _tuning(variant, name, x, peer_codes, codes, out)
    kern, tile = _kernel(name, fmt.name, block, kind, kind_out, t["vector"], t["steps"], t["tpb"], t["hw"])
    mode, d = _divide_mode(divide_by)
    launch(kern, _grid(-(-n // 4), tile * t["tpb"] // 32, t), t["tpb"],
           x, peer_codes, peer_scales, codes, scales, out, n, d, mode, out.size > 0)


def quantize_device(x, codes, scales, fmt="e4m3", block=128, variant=None):
    """codes, scales = quantize(x) on the device (same bits as ``quantize_fp8_blockwise``)."""
    f, block = fp8_format(fmt), check_block(block)
    xv, kind = _fp8_kind(x, "quantize")
    _check(codes, scales, xv.size, block)
    if xv.size:                                      # no peer, no out: empty placeholders
        _launch_quantizing("quantize", f, block, variant, xv, kind, codes[:0], scales[:0], codes, scales, xv[:0],
                           kind, 1)
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
        _launch_quantizing("hop", f, block, variant, lv, kind, peer_codes, peer_scales, codes, scales, ov, kind_out,
                           divide_by)
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
        t = _tuning(variant, name, ov, codes)
        kern, steps = _kernel(name, f.name, block, kind, t["vector"], t["steps"], t["hw"])
        launch(kern, _grid(-(-n // 4), t["tpb"] * steps, t), t["tpb"], codes, scales, ov, n)
    return out


def message_views(msg, count, block):
    """(codes, scales) views of one chunk's message buffer, as the kernels take them."""
    return split_fp8_message(msg, count, block)
