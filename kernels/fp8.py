"""numba-CUDA FP8 kernels: block-scaled quantize, dequantize, and the fused compressed-hop kernels.

Same policy and bit-for-bit the same results as kernels/reference.py (see its docstring).

Quantizing kernels work in tiles of TILE = TPB * ITEMS = 1024 elements per CUDA block, thread t
holding elements t, t+256, t+512, t+768 (coalesced). A tile holds whole FP8 blocks (block divides
1024), so each block's amax is a segmented tree max in shared memory, log2(block) steps:

    shared |x|:  [ blk 0 (block slots) | blk 1 | ... ]   step s: slot j <- max(slot j, slot j+s)
                                                          for (j mod block) < s, s = block/2 .. 1
    then slot (j - j mod block) holds the block's amax; its first thread writes the scale.

``dequant_add_requant`` is one compressed reduce-scatter hop: it reads the peer's codes and scales
and the local partial sum once, and writes the new codes and scales once (plus, at the last hop,
the owner's dequantized result), so a later IPC executor can point it at peer memory directly.
"""
import numpy as np
from numba import float32

from .device import ITEMS, TPB, bits_f32, cuda, device_fn, f32_bits, fmul_rn, kernel_view, launch_blocks
from .formats import check_block, fp8_format
from .fp8_bits import bf16_bits_from_f32_bits, make_fp8_bit_codec
from .reference import split_fp8_message

__all__ = ["quantize_device", "dequantize_device", "dequant_add_requant_device", "dequant_accumulate_device",
           "TILE"]

TILE = TPB * ITEMS
_kernels = {}
_bf16_round = device_fn(bf16_bits_from_f32_bits)


def _loader(kind):
    """Device function reading element i of a kernel-view array as fp32."""
    if kind == "bf16":
        def load(a, i):
            return bits_f32(np.int64(a[i]) << 16)
    else:
        def load(a, i):
            return np.float32(a[i])
    return device_fn(load)


def _storer(kind):
    """Device function writing an fp32 value to element i (RNE to fp16 / bf16)."""
    if kind == "bf16":
        def store(a, i, v):
            a[i] = _bf16_round(f32_bits(v))
    elif kind == "f16":
        def store(a, i, v):
            a[i] = np.float16(v)
    else:
        def store(a, i, v):
            a[i] = v
    return device_fn(store)


def _codec(fmt, block):
    """Device functions for one (format, block): encode(v, scale), decode(code, scale), scale_of(amax), tile amax."""
    f = fp8_format(fmt)
    encode_bits, decode_bits = make_fp8_bit_codec(f)
    encode_bits, decode_bits = device_fn(encode_bits), device_fn(decode_bits)
    fmax = np.float32(f.fmax)
    one = np.float32(1.0)
    mask = block - 1

    def encode(v, scale):
        b = f32_bits(v)
        if (b & 0x7F800000) == 0x7F800000:     # NaN / inf: straight from the input, as the reference does
            return encode_bits(b)
        return encode_bits(f32_bits(np.float32(v) / scale))   # the encoder saturates finite overflow

    def decode(code, scale):
        return fmul_rn(bits_f32(decode_bits(np.int64(code))), scale)

    def scale_of(amax):
        s = np.float32(amax) / fmax
        return one if s == 0 else s

    def finite_abs(v):
        return abs(np.float32(v)) if (f32_bits(v) & 0x7F800000) != 0x7F800000 else np.float32(0.0)

    def tile_amax(sh, t):
        # Segmented max over each block's slots; every thread of the CUDA block must call this.
        s = block // 2
        while s > 0:
            for k in range(ITEMS):
                j = t + k * TPB
                if (j & mask) < s:
                    other = sh[j + s]
                    if other > sh[j]:
                        sh[j] = other
            cuda.syncthreads()
            s = s // 2
    return tuple(device_fn(g) for g in (encode, decode, scale_of, finite_abs, tile_amax))


def _make_quantizing_kernel(fmt, block, kind_in, kind_out, hop):
    """quantize(x) when ``hop`` is False, else dequant-add-requant: the same tile loop around a different value."""
    encode, decode, scale_of, finite_abs, tile_amax = _codec(fmt, block)
    load, store = _loader(kind_in), _storer(kind_out)
    mask, items, tpb, tile = block - 1, ITEMS, TPB, TILE

    def body(x, peer_codes, peer_scales, codes, scales, out, n, divide_by, write_out):
        sh = cuda.shared.array(tile, float32)
        vals = cuda.local.array(items, float32)
        t = cuda.threadIdx.x
        ntiles = (n + tile - 1) // tile
        tile_id = cuda.blockIdx.x
        while tile_id < ntiles:                 # uniform across the CUDA block: syncthreads is safe
            base = tile_id * tile
            for k in range(items):
                i = base + t + k * tpb
                v = np.float32(0.0)
                if i < n:
                    v = load(x, i)
                    if hop:
                        blk = i // block
                        v = (v + decode(peer_codes[i], peer_scales[blk])) / divide_by
                vals[k] = v
                sh[t + k * tpb] = finite_abs(v)
            cuda.syncthreads()
            tile_amax(sh, t)
            for k in range(items):
                j = t + k * tpb
                i = base + j
                if i < n:
                    scale = scale_of(sh[j - (j & mask)])
                    code = encode(vals[k], scale)
                    codes[i] = code
                    if (j & mask) == 0:
                        scales[i // block] = scale
                    if write_out:
                        store(out, i, decode(code, scale))
            cuda.syncthreads()                  # shared slots are reused by the next tile
            tile_id += cuda.gridDim.x
    body = device_fn(body)

    if hop:
        def hop_kernel(local, peer_codes, peer_scales, codes, scales, out, n, divide_by, write_out):
            body(local, peer_codes, peer_scales, codes, scales, out, n, divide_by, write_out)
        return cuda.jit(hop_kernel)

    def quantize_kernel(x, codes, scales, n):
        body(x, codes, scales, codes, scales, x, n, np.float32(1.0), False)
    return cuda.jit(quantize_kernel)


def _make_elementwise_kernel(fmt, block, kind_out, accumulate):
    """dequantize into out (``accumulate`` False) or add the dequantized values into an fp32 accumulator."""
    _, decode, _, _, _ = _codec(fmt, block)
    store = _storer(kind_out)
    items = ITEMS

    def kernel(codes, scales, out, n):
        stride = cuda.gridDim.x * cuda.blockDim.x
        i0 = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
        while i0 < n:
            for k in range(items):
                i = i0 + k * stride
                if i < n:
                    v = decode(codes[i], scales[i // block])
                    if accumulate:
                        out[i] = np.float32(out[i]) + v
                    else:
                        store(out, i, v)
            i0 += items * stride
    return cuda.jit(kernel)


def _kernel(name, *key):
    full = (name,) + key
    if full not in _kernels:
        if name == "quantize":
            _kernels[full] = _make_quantizing_kernel(*key, hop=False)
        elif name == "hop":
            _kernels[full] = _make_quantizing_kernel(*key, hop=True)
        elif name == "dequantize":
            _kernels[full] = _make_elementwise_kernel(*key, accumulate=False)
        else:
            _kernels[full] = _make_elementwise_kernel(*key, accumulate=True)
    return _kernels[full]


def _fp8_kind(a, what):
    v, kind = kernel_view(a.reshape(-1))
    if kind not in ("f32", "f16", "bf16"):
        raise TypeError(f"{what}: FP8 kernels take float32, float16 or bfloat16, got {a.dtype}")
    return v, kind


def _check(codes, scales, n, block):
    if codes.size != n or scales.size != -(-n // block):
        raise ValueError(f"{n} elements with block {block} need {n} codes and {-(-n // block)} scales, "
                         f"got {codes.size} and {scales.size}")


def quantize_device(x, codes, scales, fmt="e4m3", block=128):
    """codes, scales = quantize(x) on the device (same bits as ``quantize_fp8_blockwise``)."""
    f, block = fp8_format(fmt), check_block(block)
    xv, kind = _fp8_kind(x, "quantize")
    n = xv.size
    _check(codes, scales, n, block)
    if n:
        _kernel("quantize", f.name, block, kind, kind)[launch_blocks(n), TPB](xv, codes, scales, n)
    return codes, scales


def dequantize_device(codes, scales, out, fmt="e4m3", block=128):
    """out = dequantize(codes, scales) on the device, cast to out's dtype (fp32, fp16, bf16)."""
    f, block = fp8_format(fmt), check_block(block)
    ov, kind = _fp8_kind(out, "dequantize")
    n = ov.size
    _check(codes, scales, n, block)
    if n:
        _kernel("dequantize", f.name, block, kind)[launch_blocks(n), TPB](codes, scales, ov, n)
    return out


def dequant_add_requant_device(local, peer_codes, peer_scales, codes, scales, fmt="e4m3", block=128,
                               out=None, divide_by=1):
    """One compressed hop: s = (local + dequantize(peer)) / divide_by; codes, scales = quantize(s).

    With ``out`` (same dtype as ``local``) also writes dequantize(codes, scales) there.
    """
    f, block = fp8_format(fmt), check_block(block)
    lv, kind = _fp8_kind(local, "dequant_add_requant")
    n = lv.size
    _check(peer_codes, peer_scales, n, block)
    _check(codes, scales, n, block)
    ov, kind_out = (lv, kind) if out is None else _fp8_kind(out, "dequant_add_requant out")
    if n:
        _kernel("hop", f.name, block, kind, kind_out)[launch_blocks(n), TPB](
            lv, peer_codes, peer_scales, codes, scales, ov, n, np.float32(divide_by), out is not None)
    return codes, scales


def dequant_accumulate_device(acc, codes, scales, fmt="e4m3", block=128):
    """acc (fp32) += dequantize(codes, scales) on the device: the direct reduce-scatter's owner step."""
    f, block = fp8_format(fmt), check_block(block)
    if acc.dtype != np.float32:
        raise TypeError(f"the accumulator must be float32, got {acc.dtype}")
    n = acc.size
    _check(codes, scales, n, block)
    if n:
        _kernel("accumulate", f.name, block, "f32")[launch_blocks(n), TPB](codes, scales, acc.reshape(-1), n)
    return acc


def message_views(msg, count, block):
    """(codes, scales) views of one chunk's message buffer, as the kernels take them."""
    return split_fp8_message(msg, count, block)
