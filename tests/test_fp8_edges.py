"""FP8 per-block quantize/dequantize on the edge cases: zeros, denormals, values beyond the format's
max, inf, NaN, all-equal blocks, and a block with one huge outlier.

Interface under test (module ``kernels``, whose NumPy/ml_dtypes FP8 codec is the CPU path and the
GPU kernels' reference; or the module named by $RINGLAB_FP8_MODULE):

    quantize_fp8_blockwise(x, fmt="e4m3", block=128) -> (q, scales)
        x       1-D float32 NumPy array, any length (the last block may be short)
        q       same length, dtype ml_dtypes.float8_e4m3fn / float8_e5m2 (uint8 bit patterns accepted)
        scales  float32, one per block (ceil(len / block)); element i decodes as q[i] * scales[i // block]
    dequantize_fp8_blockwise(q, scales, fmt="e4m3", block=128) -> float32 array of len(q)

Contract checked here (DESIGN.md: scale = amax / fmax, round to nearest even, saturate):
  * finite blocks: |x - x'| <= 2^-(m+1) |x| + (smallest subnormal / 2) * scale   (m mantissa bits),
    q holds no NaN and |q| <= fmax, scale finite and > 0, and amax / scale within [fmax / 2, fmax];
  * an all-zero block decodes to exact zeros with a finite scale;
  * float32 denormals decode finite, within that bound or flushed to zero (|error| < FLT_MIN);
  * inf or NaN in a block: that element decodes non-finite (never a silent finite number);
    the other blocks are unaffected (other elements of the same block are unspecified);
  * identical inputs in a block decode to identical outputs.
"""
import importlib
import os

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")
_module_name = os.environ.get("RINGLAB_FP8_MODULE", "kernels")
fp8 = pytest.importorskip(_module_name, reason=f"{_module_name} not written yet")
if not hasattr(fp8, "quantize_fp8_blockwise") or not hasattr(fp8, "dequantize_fp8_blockwise"):
    pytest.skip(f"{_module_name} lacks quantize_fp8_blockwise/dequantize_fp8_blockwise", allow_module_level=True)

# format -> (ml_dtypes type, max finite, mantissa bits, smallest subnormal)
FORMATS = {"e4m3": (ml_dtypes.float8_e4m3fn, 448.0, 3, 2.0 ** -9),
           "e5m2": (ml_dtypes.float8_e5m2, 57344.0, 2, 2.0 ** -16)}
FLT_MIN = np.finfo(np.float32).tiny
BLOCKS = (32, 128)


def roundtrip(x, fmt, block):
    """Quantize and dequantize ``x``; returns (decoded float32, q as the FP8 dtype, scales)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    q, scales = fp8.quantize_fp8_blockwise(x.copy(), fmt=fmt, block=block)
    q, scales = np.asarray(q), np.asarray(scales)
    if q.dtype == np.uint8:
        q = q.view(FORMATS[fmt][0])
    assert q.dtype == FORMATS[fmt][0] and q.shape == x.shape
    assert scales.dtype == np.float32 and scales.shape == (-(-x.size // block),)
    out = np.asarray(fp8.dequantize_fp8_blockwise(q, scales, fmt=fmt, block=block))
    assert out.dtype == np.float32 and out.shape == x.shape
    return out, q, scales


def assert_block_accurate(x, out, q, scales, fmt, block, b):
    """The finite-block contract of the module docstring, for block ``b``."""
    _, fmax, mbits, sub = FORMATS[fmt]
    sl = slice(b * block, (b + 1) * block)
    xs, outs, qs = x[sl].astype(np.float64), out[sl].astype(np.float64), q[sl].astype(np.float64)
    scale = float(scales[b])
    assert np.isfinite(scale) and scale > 0, f"block {b}: scale {scale}"
    assert np.isfinite(qs).all() and np.abs(qs).max() <= fmax, f"block {b}: NaN or out-of-range FP8 codes"
    amax = np.abs(xs).max()
    if amax >= FLT_MIN:  # uses the format's range (a power-of-two scale may lose up to a factor 2)
        assert fmax / 2 * (1 - 1e-6) <= amax / scale <= fmax * (1 + 1e-6), f"block {b}: amax/scale = {amax / scale}"
    allowed = 2.0 ** -(mbits + 1) * np.abs(xs) + sub / 2 * scale + 1e-6 * amax
    err = np.abs(outs - xs)
    assert (err <= allowed).all(), f"block {b}: max error {err.max():.3g} at {int(np.argmax(err - allowed))}"


def rng_blocks(nblocks, block, seed=0, tail=5):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, nblocks * block + tail).astype(np.float32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
def test_random_blocks_and_short_tail(fmt, block):
    decades = np.repeat(np.arange(-2, 2), block)[: 3 * block + 5].astype(np.float32)  # 0.01x .. 10x per block
    x = rng_blocks(3, block) * np.float32(10.0) ** decades
    out, q, scales = roundtrip(x, fmt, block)
    for b in range(scales.size):
        assert_block_accurate(x, out, q, scales, fmt, block, b)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
def test_zeros(fmt, block):
    x = np.zeros(2 * block + 3, dtype=np.float32)
    x[block: 2 * block] = rng_blocks(1, block, tail=0)     # a live block between zero blocks
    x[1] = -0.0
    out, q, scales = roundtrip(x, fmt, block)
    assert np.isfinite(scales).all(), f"zero block gave scale {scales}"
    assert (out[:block] == 0).all() and (out[2 * block:] == 0).all()
    assert_block_accurate(x, out, q, scales, fmt, block, 1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_denormals(fmt):
    block = 32
    tiny = np.float32(FLT_MIN)
    x = np.concatenate([
        (rng_blocks(1, block, 1, 0) * tiny * np.float32(0.5)),        # a block of float32 denormals only
        np.full(block, 1e-45, dtype=np.float32),                      # the smallest denormal, repeated
        rng_blocks(1, block, 2, 0) * np.float32(1e-40) + np.float32(1.0),  # denormal noise on normal values
    ]).astype(np.float32)
    out, q, scales = roundtrip(x, fmt, block)
    assert np.isfinite(out).all() and np.isfinite(scales).all()
    _, fmax, mbits, sub = FORMATS[fmt]
    for b in range(2):
        sl = slice(b * block, (b + 1) * block)
        err = np.abs(out[sl].astype(np.float64) - x[sl])
        bound = np.maximum(2.0 ** -(mbits + 1) * np.abs(x[sl].astype(np.float64)) + sub / 2 * float(scales[b]), FLT_MIN)
        assert (err <= bound).all(), f"denormal block {b}: error {err.max():.3g}"
    assert_block_accurate(x, out, q, scales, fmt, block, 2)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("magnitude", [449.0, 57345.0, 1e6, 1e30, float(np.finfo(np.float32).max)])
def test_values_beyond_the_format_max(fmt, magnitude):
    block = 32
    x = rng_blocks(2, block, 3, 0)
    x[3], x[7], x[block + 1] = magnitude, -magnitude, magnitude * np.float32(0.75)
    out, q, scales = roundtrip(x, fmt, block)
    assert np.isfinite(out).all(), "finite input beyond the FP8 max decoded as inf/NaN (no saturation?)"
    for b in range(2):
        assert_block_accurate(x, out, q, scales, fmt, block, b)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan])
def test_inf_and_nan_are_not_hidden(fmt, special):
    block = 32
    x = rng_blocks(3, block, 4, 0)
    x[block + 5] = special
    out, q, scales = roundtrip(x, fmt, block)
    assert not np.isfinite(out[block + 5]), f"{special} decoded as the finite {out[block + 5]}"
    for b in (0, 2):  # neighbouring blocks keep their own scale and accuracy
        assert_block_accurate(x, out, q, scales, fmt, block, b)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("value", [3.7, -0.001, 448.0, 1e5, 1.0])
def test_all_equal_blocks(fmt, value):
    block = 32
    x = np.full(2 * block + 1, value, dtype=np.float32)
    out, q, scales = roundtrip(x, fmt, block)
    assert (out == out[0]).all(), "identical inputs decoded differently"
    for b in range(scales.size):
        assert_block_accurate(x, out, q, scales, fmt, block, b)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", BLOCKS)
def test_one_huge_outlier_stays_in_its_block(fmt, block):
    x = rng_blocks(3, block, 5, 0)
    x[block + 2] = 1e4
    out, q, scales = roundtrip(x, fmt, block)
    for b in range(3):
        assert_block_accurate(x, out, q, scales, fmt, block, b)
    _, fmax, mbits, _ = FORMATS[fmt]
    assert abs(out[block + 2] - 1e4) <= 2.0 ** -(mbits + 1) * 1e4
    # Per-block scaling: the outlier's block has a larger scale, the others keep theirs.
    assert scales[1] > 100 * max(scales[0], scales[2])


@pytest.mark.parametrize("fmt,values,expected", [
    # amax = fmax, so scale = 1 and each value is rounded by the format alone (ties to even).
    ("e4m3", [448.0, 1.0625, 1.1875, -1.0625, 0.5, 3.5, 2.0 ** -9], [448.0, 1.0, 1.25, -1.0, 0.5, 3.5, 2.0 ** -9]),
    ("e5m2", [57344.0, 1.125, 1.375, -1.125, 0.75, 2.0 ** -16], [57344.0, 1.0, 1.5, -1.0, 0.75, 2.0 ** -16]),
])
def test_round_to_nearest_even_with_unit_scale(fmt, values, expected):
    out, q, scales = roundtrip(np.array(values, dtype=np.float32), fmt, 32)
    assert scales[0] == 1.0, f"amax = fmax should give scale 1 (scale = amax / fmax), got {scales[0]}"
    assert out.tolist() == expected
