"""FP8 formats (OCP E4M3fn and E5M2): the constants every quantizer and kernel reads."""
# E4M3fn: 4 exponent bits (bias 7), 3 mantissa bits, max 448, no infinity, NaN = 0x7f / 0xff.
# E5M2:   5 exponent bits (bias 15), 2 mantissa bits, max 57344, +-inf = 0x7c / 0xfc, NaN = 0x7e / 0xfe
#         (any exponent-31 code with a non-zero mantissa decodes to NaN).
# The quantizers write only the unsigned NaN code (0x7f / 0x7e); all NaN codes decode to NaN.

from dataclasses import dataclass

import numpy as np

__all__ = ["Fp8Format", "FP8_FORMATS", "fp8_format", "BLOCK_SIZES", "check_block", "FP8_INPUT_DTYPES",
           "check_fp8_input_dtype"]

# Power-of-two block sizes only: a GPU tile of 1024 elements then holds whole blocks (see kernels/fp8.py).
BLOCK_SIZES = (32, 64, 128, 256)


@dataclass(frozen=True)
class Fp8Format:
    """One FP8 format: bit layout, largest finite value and its special codes."""
    name: str            # "e4m3" or "e5m2"
    ebits: int
    mbits: int
    bias: int
    fmax: float          # largest finite magnitude
    max_code: int        # code of +fmax (sign bit clear)
    has_inf: bool
    inf_code: int        # +inf code, or the NaN code when the format has no infinity
    nan_code: int        # the +NaN code this project writes (sign bit carries the input's sign)
    ml_dtype_name: str   # the ml_dtypes type with the same bit layout

    @property
    def ml_dtype(self):
        import ml_dtypes
        return np.dtype(getattr(ml_dtypes, self.ml_dtype_name))

    @property
    def fmax32(self):
        return np.float32(self.fmax)

    @property
    def rcp_fmax32(self):
        """fp32(1 / fmax): scale = amax * this (one multiply, identical on NumPy and the GPU)."""
        return np.float32(1.0 / self.fmax)


FP8_FORMATS = {
    "e4m3": Fp8Format("e4m3", 4, 3, 7, 448.0, 0x7E, False, 0x7F, 0x7F, "float8_e4m3fn"),
    "e5m2": Fp8Format("e5m2", 5, 2, 15, 57344.0, 0x7B, True, 0x7C, 0x7E, "float8_e5m2"),
}


def fp8_format(fmt):
    """The Fp8Format for ``fmt`` ("e4m3", "e4m3fn" or "e5m2", or an Fp8Format); clear error otherwise."""
    if isinstance(fmt, Fp8Format):
        return fmt
    key = str(fmt).lower().replace("float8_", "")
    key = "e4m3" if key == "e4m3fn" else key
    if key not in FP8_FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; expected 'e4m3' (E4M3fn) or 'e5m2'")
    return FP8_FORMATS[key]


def check_block(block):
    """Raise ValueError unless ``block`` is one of BLOCK_SIZES (elements per fp32 scale)."""
    if isinstance(block, bool) or not isinstance(block, (int, np.integer)) or int(block) not in BLOCK_SIZES:
        raise ValueError(f"block must be one of {BLOCK_SIZES} elements per scale, got {block!r}")
    return int(block)


def _fp8_input_dtypes():
    from ml_dtypes import bfloat16
    return (np.dtype(np.float32), np.dtype(np.float16), np.dtype(bfloat16))


FP8_INPUT_DTYPES = ("float32", "float16", "bfloat16")


def check_fp8_input_dtype(dtype):
    """Raise TypeError unless ``dtype`` is a float type FP8 compression accepts (fp32, fp16, bf16)."""
    dt = np.dtype(dtype)
    if dt not in _fp8_input_dtypes():
        kind = "integer" if dt.kind in "iub" else dt.name
        raise TypeError(f"FP8 compression needs float32, float16 or bfloat16 input, got {dt.name}"
                        + (" (integers cannot be scaled into FP8 without losing their exactness)"
                           if kind == "integer" else ""))
    return dt
