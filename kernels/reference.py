"""NumPy references: elementwise reduce and block-scaled FP8 quantize / dequantize (ml_dtypes casts)."""
# These are the CPU path of the FP8 collectives and the oracle the numba-CUDA kernels are tested
# against, bit for bit. The policy they implement (docs/fp8.md):
#
# - scale = fp32(amax * fp32(1 / fmax)), one per block of ``block`` elements, amax over the block's
#   finite values. A block whose scale is below 2**-126 (all zeros, or amax < fmax * 2**-126, about
#   5e-36 for E4M3) gets scale 1.0: its finite values then encode as +-0, and 1 / scale is finite.
# - finite values: code = RNE(clamp(x * inv, -fmax, fmax)) with inv = fp32(1 / scale) computed once per
#   block (a multiply per element, not a division: what GPUs do fast), so overflow saturates at +-fmax.
# - every NaN encodes as the format's one NaN code, 0x7f (E4M3fn) / 0x7e (E5M2), without a sign:
#   IEEE 754 leaves the sign of an arithmetic NaN unspecified, x86 propagates an operand's sign while
#   NVIDIA GPUs return the canonical NaN, so a signed NaN code would make the fused hop differ between
#   NumPy and the GPU. +-inf stays +-inf in E5M2 and becomes that NaN code in E4M3fn (no infinity).
#   Non-finite values are left out of amax, so one inf does not flush its block to zero.
# - dequantize: decoded * scale in fp32 (one rounding), then cast to the output dtype (RNE).

import numpy as np

from ringlab.kernels.formats import check_block, check_fp8_input_dtype, fp8_format
from ringlab.kernels.optable import OP_TABLE

__all__ = ["fp8_message_nbytes", "split_fp8_message", "block_scales", "quantize_fp8_blockwise",
           "dequantize_fp8_blockwise", "dequant_add_requant_reference", "dequant_accumulate_reference",
           "reduce_reference", "to_float32"]


def fp8_message_nbytes(count, block):
    """Bytes of one chunk's wire message: ``count`` codes, padding to 4 bytes, one fp32 scale per block."""
    nblocks = -(-count // block)
    return _align4(count) + 4 * nblocks


def _align4(n):
    return (n + 3) & ~3


def split_fp8_message(msg, count, block):
    """(codes uint8[count], scales float32[nblocks]) views into a message buffer (NumPy or CuPy)."""
    nblocks = -(-count // block)
    off = _align4(count)
    return msg[:count], msg[off: off + 4 * nblocks].view(np.float32)


def to_float32(x):
    """fp32 copy (or the array itself if it already is fp32) of a float16/bfloat16/float32 array."""
    return x if x.dtype == np.float32 else x.astype(np.float32)


def _blocks(v, block, fill=0.0):
    """``v`` padded with ``fill`` to whole blocks, shaped (nblocks, block)."""
    nblocks = -(-v.size // block)
    if v.size == nblocks * block:
        return v.reshape(nblocks, block)
    padded = np.full(nblocks * block, fill, dtype=v.dtype)
    padded[: v.size] = v
    return padded.reshape(nblocks, block)


_tables = {}


def _decode_table(f):
    """fp32 value of each of the 256 codes, from ml_dtypes."""
    if f.name not in _tables:
        _tables[f.name] = np.arange(256, dtype=np.uint8).view(f.ml_dtype).astype(np.float32)
    return _tables[f.name]


MIN_SCALE = np.float32(2.0 ** -126)     # smallest normal fp32: 1 / scale stays finite


def block_scales(x32, fmt, block):
    """fp32 scale per block: amax(finite |x|) * fp32(1/fmax), or 1.0 where that is below MIN_SCALE."""
    f = fp8_format(fmt)
    mag = np.abs(x32)
    mag[~np.isfinite(mag)] = 0.0
    amax = _blocks(mag, block).max(axis=1) if x32.size else np.zeros(0, np.float32)
    scales = (amax * f.rcp_fmax32).astype(np.float32)
    scales[scales < MIN_SCALE] = 1.0
    return scales


def quantize_fp8_blockwise(x, fmt="e4m3", block=128, codes=None, scales=None):
    """Quantize a flat float array to FP8 codes (uint8) with one fp32 scale per ``block`` elements.

    Returns ``(codes, scales)``; pass ``codes``/``scales`` to write into existing arrays.
    """
    f, block = fp8_format(fmt), check_block(block)
    x = np.asarray(x).reshape(-1)
    check_fp8_input_dtype(x.dtype)
    x32 = to_float32(x)
    s = block_scales(x32, f, block)
    inv = np.float32(1.0) / s
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = _blocks(x32, block) * inv[:, None]
        scaled = np.clip(scaled.reshape(-1)[: x32.size], -f.fmax32, f.fmax32)
    nonfinite = ~np.isfinite(x32)
    scaled[nonfinite] = x32[nonfinite]          # NaN / inf are cast straight from the input
    q = scaled.astype(f.ml_dtype).view(np.uint8)
    q[np.isnan(x32) if f.has_inf else nonfinite] = f.nan_code     # one unsigned NaN code (policy above)
    if codes is None:
        codes = q
    else:
        codes[...] = q
    if scales is None:
        scales = s
    else:
        scales[...] = s
    return codes, scales


def dequantize_fp8_blockwise(codes, scales, fmt="e4m3", block=128, out=None, dtype=np.float32):
    """Decode FP8 ``codes`` with their block ``scales``: decoded * scale in fp32, cast to ``dtype``."""
    f, block = fp8_format(fmt), check_block(block)
    codes = np.asarray(codes).reshape(-1)
    if codes.dtype != np.uint8:                  # ml_dtypes float8 arrays: the same bytes
        if codes.dtype.itemsize != 1:
            raise TypeError(f"FP8 codes must be uint8 or an 8-bit float dtype, got {codes.dtype}")
        codes = codes.view(np.uint8)
    scales = np.asarray(scales, dtype=np.float32).reshape(-1)
    if scales.size != -(-codes.size // block):
        raise ValueError(f"{codes.size} codes with block {block} need {-(-codes.size // block)} scales, "
                         f"got {scales.size}")
    decoded = _decode_table(f)[codes]            # 256-entry table: the same values as ml_dtypes' cast, faster
    with np.errstate(invalid="ignore", over="ignore"):
        v = (_blocks(decoded, block) * scales[:, None].astype(np.float32)).reshape(-1)[: codes.size]
    if out is None:
        return v if np.dtype(dtype) == np.float32 else v.astype(dtype)
    out[...] = v.astype(out.dtype, copy=False)
    return out


def dequant_add_requant_reference(local, codes, scales, fmt="e4m3", block=128, divide_by=1, out=None):
    """One compressed reduce-scatter hop: s = (local + dequantize(peer)) / divide_by in fp32, requantized.

    Returns ``(new_codes, new_scales)``; with ``out`` also writes dequantize(new payload) into it
    (the owner's final value, equal to what every other rank will decode).
    """
    f = fp8_format(fmt)
    with np.errstate(invalid="ignore", over="ignore"):
        s = to_float32(np.asarray(local).reshape(-1)) + dequantize_fp8_blockwise(codes, scales, f, block)
        s = s / np.float32(divide_by)
    new_codes, new_scales = quantize_fp8_blockwise(s, f, block)
    if out is not None:
        dequantize_fp8_blockwise(new_codes, new_scales, f, block, out=out.reshape(-1))
    return new_codes, new_scales


def dequant_accumulate_reference(acc, codes, scales, fmt="e4m3", block=128):
    """acc += dequantize(codes, scales), in fp32 (the direct / qgZ reduce-scatter's owner step)."""
    with np.errstate(invalid="ignore", over="ignore"):
        np.add(acc, dequantize_fp8_blockwise(codes, scales, fmt, block), out=acc)
    return acc


def reduce_reference(a, b, op="sum", out=None):
    """dst = a (op) b elementwise for sum/prod/max/min; bfloat16 goes through ml_dtypes (fp32, RNE)."""
    if op not in OP_TABLE or op == "avg":
        raise ValueError(f"unknown op {op!r}; expected one of sum, prod, max, min")
    with np.errstate(all="ignore"):
        return getattr(np, OP_TABLE[op].ufunc)(a, b, out=out)
