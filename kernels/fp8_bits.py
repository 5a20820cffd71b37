"""Scalar FP8 <-> fp32 bit conversions in plain integer arithmetic, for numba-CUDA device code.

Written once as Python closures over a format's constants: the CUDA kernels compile them as
device functions, the simulator runs them as Python, and tests run them on CPU against ml_dtypes
over every interesting fp32 pattern. Integers here are fp32 bit patterns as non-negative ints.
"""
from .formats import fp8_format

__all__ = ["make_fp8_bit_codec", "bf16_bits_from_f32_bits"]


def make_fp8_bit_codec(fmt):
    """(encode, decode) for one format.

    ``encode(bits32)``: fp32 bit pattern -> FP8 code, round to nearest even, finite overflow
    saturating at +-fmax, NaN -> NaN and inf -> inf (E5M2) / NaN (E4M3fn), signs kept.
    ``decode(code)``: FP8 code -> fp32 bit pattern (exact; NaN -> quiet NaN with the code's sign).
    """
    f = fp8_format(fmt)
    mbits, bias, max_code = f.mbits, f.bias, f.max_code
    inf_code, nan_code, has_inf = f.inf_code, f.nan_code, f.has_inf
    mmask = (1 << mbits) - 1
    emax_code = (1 << f.ebits) - 1
    sub_exp32 = 1 - bias + 127      # fp32 exponent of the smallest FP8 normal

    def encode(b):
        sign = (b >> 24) & 0x80
        a = b & 0x7FFFFFFF
        if a >= 0x7F800000:
            if a == 0x7F800000:
                return sign | inf_code
            return sign | nan_code
        e32 = a >> 23
        if e32 == 0:                 # fp32 zero or subnormal: far below half the smallest FP8 subnormal
            return sign
        sig = (a & 0x7FFFFF) | 0x800000
        e8 = e32 - 127 + bias
        if e8 >= 1:                  # normal: keep mbits of the 23-bit fraction
            shift = 23 - mbits
            base = (e8 - 1) << mbits     # + sig >> shift (which includes the implicit 1) = (e8 << m) | frac
        else:                        # FP8 subnormal: units of 2**(1 - bias - mbits)
            shift = 24 - mbits - e8
            base = 0
            if shift > 25:           # value < a quarter of the smallest subnormal: rounds to 0
                return sign
        q = sig >> shift
        rem = sig & ((1 << shift) - 1)
        half = 1 << (shift - 1)
        if rem > half or (rem == half and (q & 1) == 1):
            q += 1                   # a carry out of the fraction bumps the exponent, as it should
        mag = base + q
        if mag > max_code:
            mag = max_code
        return sign | mag

    def decode(c):
        sign = (c & 0x80) << 24
        mag = c & 0x7F
        e8 = mag >> mbits
        m = mag & mmask
        if has_inf:
            if e8 == emax_code:
                if m == 0:
                    return sign | 0x7F800000
                return sign | 0x7FC00000
        elif mag == 0x7F:
            return sign | 0x7FC00000
        if e8 == 0:
            if m == 0:
                return sign
            e32 = sub_exp32
            while m <= mmask:        # normalise the subnormal: shift until the implicit bit appears
                m = m << 1
                e32 -= 1
            return sign | (e32 << 23) | ((m & mmask) << (23 - mbits))
        return sign | ((e8 - bias + 127) << 23) | (m << (23 - mbits))

    return encode, decode


def bf16_bits_from_f32_bits(b):
    """fp32 bit pattern -> bfloat16 bit pattern, round to nearest even; NaN stays a quiet NaN."""
    if (b & 0x7FFFFFFF) > 0x7F800000:
        return ((b >> 16) | 0x40) & 0xFFFF
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) & 0xFFFF
