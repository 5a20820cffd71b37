"""Scalar FP8 <-> fp32 conversions (fp32 arithmetic + bit tricks) and fp32 -> bf16 rounding, for device code."""
# Written once as Python closures over a format's constants: the CUDA kernels compile them as
# device functions, the simulator runs them as Python, and tests run them on CPU against ml_dtypes
# over every interesting fp32 pattern. Integers here are fp32 bit patterns as non-negative ints.

import numpy as np

from ringlab.kernels.formats import fp8_format

__all__ = ["make_fp8_value_codec", "bf16_bits_from_f32_bits"]


def make_fp8_value_codec(fmt, f32_bits, bits_f32, fmul_rn):
    """(encode_scaled, decode_value): the kernels' branch-light codec, fp32 arithmetic + a few integer ops.

    ``encode_scaled(v, inv)``: code of RNE(clamp(v * inv, +-fmax)) for finite ``v``; NaN -> the unsigned
    NaN code, inf -> +-inf (E5M2) / NaN (E4M3fn). Normal results round with one integer add on the fp32
    bits (a carry bumps the exponent); FP8-subnormal results round in the fp32 adder: y + 2**e is
    correctly rounded to the FP8 subnormal spacing when ulp(2**e) is that spacing, so no loop, no table.
    ``decode_value(code)``: the exact fp32 value: the code's bits shifted into an fp32 and multiplied by
    2**(127 - bias) (exact, FP8 subnormals included as long as fp32 subnormals are not flushed).
    The bit casts and ``fmul_rn`` (a multiply never fused into an FMA) are passed in: libdevice on the
    GPU, NumPy in the simulator and in CPU tests.
    """
    f = fp8_format(fmt)
    mbits, has_inf, inf_code, nan_code = f.mbits, f.has_inf, f.inf_code, f.nan_code
    shift = 23 - mbits
    round_half = (1 << (shift - 1)) - 1
    rebias = (127 - f.bias) << mbits
    fmax = np.float32(f.fmax)
    min_normal = np.float32(2.0 ** (1 - f.bias))
    magic_exp = 24 - f.bias - mbits                  # ulp(2**magic_exp) = smallest FP8 subnormal
    magic = np.float32(2.0 ** magic_exp)
    magic_bits = (magic_exp + 127) << 23
    to_fp32_exp = np.float32(2.0 ** (127 - f.bias))
    nan32 = 0x7FC00000

    def encode_scaled(v, inv):
        b = f32_bits(v)
        y = fmul_rn(abs(v), inv)
        if not y < fmax:                             # saturate (a NaN y is replaced below)
            y = fmax
        if y < min_normal:
            mag = f32_bits(y + magic) - magic_bits
        else:
            yb = f32_bits(y)
            mag = ((yb + round_half + ((yb >> shift) & 1)) >> shift) - rebias
        if (b & 0x7F800000) == 0x7F800000:
            if has_inf and (b & 0x7FFFFF) == 0:
                return ((b >> 24) & 0x80) | inf_code
            return nan_code
        return ((b >> 24) & 0x80) | mag

    def decode_value(c):
        mag = c & 0x7F
        if has_inf:
            if mag >= inf_code:
                return bits_f32(((c & 0x80) << 24) | (0x7F800000 if mag == inf_code else nan32))
        elif mag == 0x7F:
            return bits_f32(nan32)
        return fmul_rn(bits_f32(((c & 0x80) << 24) | (mag << shift)), to_fp32_exp)

    return encode_scaled, decode_value


def bf16_bits_from_f32_bits(b):
    """fp32 bit pattern -> bfloat16 bit pattern, round to nearest even; NaN stays a quiet NaN."""
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return ((b >> 16) | 0x40) & 0xFFFF
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
