"""FP8 quantization: policy of the NumPy reference, the bit-level codec vs ml_dtypes, and the numba
kernels vs the reference (in the CUDA simulator on CPU, on the GPU where there is one)."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ml_dtypes import bfloat16

from ringlab import kernels
from ringlab.kernels.fp8_bits import bf16_bits_from_f32_bits, make_fp8_value_codec
from ringlab.kernels.reference import (dequant_accumulate_reference, dequant_add_requant_reference, dequantize_fp8_blockwise,
                               fp8_message_nbytes, quantize_fp8_blockwise, split_fp8_message)

FMTS = ("e4m3", "e5m2")


def _np_codec(fmt):
    """The kernels' value codec on NumPy primitives (as the simulator runs it): (encode(v, inv), decode(code))."""
    def fmul(a, b):
        with np.errstate(over="ignore"):
            return np.float32(a) * np.float32(b)
    return make_fp8_value_codec(fmt, lambda x: int(np.float32(x).view(np.uint32)),
                                lambda b: np.uint32(b).view(np.float32), fmul)


# ---- reference policy ---------------------------------------------------------------------------

def test_scale_is_amax_over_fmax_and_roundtrip_error_is_half_ulp():
    rng = np.random.default_rng(0)
    for fmt, mbits, fmax in (("e4m3", 3, 448.0), ("e5m2", 2, 57344.0)):
        x = rng.standard_normal(1000).astype(np.float32)
        codes, scales = quantize_fp8_blockwise(x, fmt, 128)
        amax = np.array([np.abs(x[i:i + 128]).max() for i in range(0, 1000, 128)], np.float32)
        assert np.array_equal(scales, amax * np.float32(1 / fmax))      # a multiply: the same bits on any hardware
        y = dequantize_fp8_blockwise(codes, scales, fmt, 128)
        bound = np.repeat(amax, 128)[:1000] * 2.0 ** -(mbits + 1) * 1.0001
        assert (np.abs(y - x) <= bound).all()
        assert np.allclose(np.abs(y).max(), np.abs(x).max(), rtol=2 ** -22, atol=0)  # amax -> fmax -> ~amax


def test_zero_and_underflowing_blocks_get_scale_one_and_decode_to_zero():
    x = np.zeros(96, np.float32)
    x[32:64] = 1e-37                     # amax / 448 < 2**-126: treated like a zero block (1/scale finite)
    x[64] = -0.0
    x[65:96] = 1.0
    codes, scales = quantize_fp8_blockwise(x, "e4m3", 32)
    assert scales.tolist() == [1.0, 1.0, np.float32(1) / np.float32(448)]
    assert (codes[:64] == 0).all() and codes[64] == 0x80        # -0 keeps its sign
    y = dequantize_fp8_blockwise(codes, scales, "e4m3", 32)
    assert np.isfinite(y).all() and (y[:65] == 0).all() and np.array_equal(y[65:], x[65:])


@pytest.mark.parametrize("fmt", FMTS)
def test_nonfinite_policy(fmt):
    x = np.array([1.0, np.nan, -np.nan, np.inf, -np.inf, 2.0, 1e30, -1e30] + [0.5] * 24, np.float32)
    codes, scales = quantize_fp8_blockwise(x, fmt, 32)
    assert scales[0] == np.float32(1e30) / np.float32(448 if fmt == "e4m3" else 57344)   # inf/NaN not in amax
    if fmt == "e4m3":
        assert codes[1:5].tolist() == [0x7F] * 4         # one unsigned NaN code; no inf in E4M3fn: inf -> NaN
    else:
        assert codes[1:5].tolist() == [0x7E, 0x7E, 0x7C, 0xFC]
    assert codes[6] in (0x7E, 0x7B) and codes[7] in (0xFE, 0xFB)    # amax encodes as +-fmax
    y = dequantize_fp8_blockwise(codes, scales, fmt, 32)
    assert np.isnan(y[1]) and np.isnan(y[2])
    if fmt == "e5m2":
        assert y[3] == np.inf and y[4] == -np.inf
    else:
        assert np.isnan(y[3]) and np.isnan(y[4])


@pytest.mark.parametrize("fmt", FMTS)
def test_nan_code_does_not_depend_on_the_platforms_nan_sign(fmt):
    # Regression (GPU run 6): x86 keeps an operand's NaN sign in local + (-NaN), NVIDIA GPUs return the
    # canonical +NaN, so a sign-keeping encoder made the fused hop's codes differ (0xff vs 0x7f).
    f = kernels.fp8_format(fmt)
    peer = np.full(32, 1.0, np.float32)
    peer[:4] = [np.nan, -np.nan, np.inf, -np.inf]
    pc, ps = quantize_fp8_blockwise(peer, fmt, 32)
    pc[5] = 0xFF                                       # a signed NaN code from some other writer
    local = np.arange(32, dtype=np.float32)
    codes, _ = dequant_add_requant_reference(local, pc, ps, fmt, 32)
    nan_sum = np.isnan(local + dequantize_fp8_blockwise(pc, ps, fmt, 32))
    assert nan_sum[[0, 1, 5]].all() and (codes[nan_sum] == f.nan_code).all()
    with np.errstate(invalid="ignore"):
        neg_nan = -np.abs(np.float32([np.nan] * 32))
    assert (quantize_fp8_blockwise(neg_nan, fmt, 32)[0] == f.nan_code).all()


def test_finite_overflow_saturates():
    # a scale far below amax/fmax (as after a rounding) must saturate, never produce NaN/inf
    for fmt in FMTS:
        encode, _ = _np_codec(fmt)
        fmax = kernels.fp8_format(fmt).fmax
        for v in (fmax * 1.04, fmax * 1.07, fmax * 1.5, 3e38):
            assert encode(np.float32(v), np.float32(1)) == kernels.fp8_format(fmt).max_code
            assert encode(np.float32(-v), np.float32(1)) == 0x80 | kernels.fp8_format(fmt).max_code
        assert encode(np.float32(3e38), np.float32(2.0 ** 126)) == kernels.fp8_format(fmt).max_code


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="integers"):
        quantize_fp8_blockwise(np.arange(10, dtype=np.int32))
    with pytest.raises(TypeError, match="float64"):
        quantize_fp8_blockwise(np.ones(10))
    with pytest.raises(ValueError, match="block"):
        quantize_fp8_blockwise(np.ones(10, np.float32), block=100)
    with pytest.raises(ValueError, match="format"):
        quantize_fp8_blockwise(np.ones(10, np.float32), fmt="e2m5")
    with pytest.raises(ValueError, match="scales"):
        dequantize_fp8_blockwise(np.zeros(100, np.uint8), np.ones(1, np.float32), "e4m3", 32)


def test_message_layout():
    assert fp8_message_nbytes(0, 32) == 0
    assert fp8_message_nbytes(1, 32) == 4 + 4
    assert fp8_message_nbytes(130, 128) == 132 + 8
    msg = np.zeros(fp8_message_nbytes(130, 128), np.uint8)
    codes, scales = split_fp8_message(msg, 130, 128)
    assert codes.size == 130 and scales.size == 2 and scales.dtype == np.float32
    scales[:] = 2.0
    assert msg[132:].view(np.float32).tolist() == [2.0, 2.0]


def test_hop_and_accumulate_references_are_fp32_arithmetic():
    rng = np.random.default_rng(1)
    local = rng.standard_normal(300).astype(bfloat16)
    codes, scales = quantize_fp8_blockwise(rng.standard_normal(300).astype(np.float32), "e5m2", 64)
    peer = dequantize_fp8_blockwise(codes, scales, "e5m2", 64)
    out = np.empty(300, bfloat16)
    c, s = dequant_add_requant_reference(local, codes, scales, "e5m2", 64, divide_by=3, out=out)
    want = (local.astype(np.float32) + peer) / np.float32(3)
    assert np.array_equal(c, quantize_fp8_blockwise(want, "e5m2", 64)[0])
    assert np.array_equal(out, dequantize_fp8_blockwise(c, s, "e5m2", 64).astype(bfloat16))
    acc = np.ones(300, np.float32)
    dequant_accumulate_reference(acc, codes, scales, "e5m2", 64)
    assert np.array_equal(acc, np.float32(1) + peer)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 700), st.sampled_from(FMTS), st.sampled_from(kernels.BLOCK_SIZES),
       st.floats(-30, 30), st.integers(0, 2 ** 31))
def test_roundtrip_error_bound_property(n, fmt, block, log2_scale, seed):
    x = (np.random.default_rng(seed).standard_normal(n) * 2.0 ** log2_scale).astype(np.float32)
    codes, scales = quantize_fp8_blockwise(x, fmt, block)
    y = dequantize_fp8_blockwise(codes, scales, fmt, block)
    amax = np.repeat([np.abs(x[i:i + block]).max() for i in range(0, n, block)], block)[:n]
    assert (np.abs(y - x) <= amax * 2.0 ** -(kernels.fp8_format(fmt).mbits + 1) * 1.0001 + 1e-45).all()


# ---- the bit-level codec the kernels compile, against ml_dtypes ----------------------------------

def _interesting_f32(fmt):
    """Every FP8 value, every midpoint between neighbours and its fp32 neighbours, random values."""
    f = kernels.fp8_format(fmt)
    grid = np.arange(256, dtype=np.uint8).view(f.ml_dtype).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])
    mids = ((grid[:-1].astype(np.float64) + grid[1:]) / 2).astype(np.float32)
    rng = np.random.default_rng(2)
    rand = (rng.uniform(-1, 1, 4000) * 2.0 ** rng.uniform(-24, np.log2(f.fmax) + 1, 4000)).astype(np.float32)
    vals = np.concatenate([grid, mids, np.nextafter(mids, np.inf), np.nextafter(mids, -np.inf), rand,
                           np.float32([1e-40, -1e-45, 3e38, -3e38, f.fmax * 1.01, 0.0, -0.0])])
    return vals.astype(np.float32)


@pytest.mark.parametrize("fmt", FMTS)
def test_value_encoder_matches_ml_dtypes(fmt):
    f = kernels.fp8_format(fmt)
    encode, _ = _np_codec(fmt)
    vals = _interesting_f32(fmt)
    want = np.clip(vals, -f.fmax32, f.fmax32).astype(f.ml_dtype).view(np.uint8)
    got = np.array([encode(v, np.float32(1)) for v in vals], dtype=np.uint8)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, [(float(vals[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]
    inv = np.float32(1) / np.float32(0.37)          # scaled: RNE(clamp(v * inv)), the product rounded once
    with np.errstate(over="ignore"):
        prod = (vals * inv).astype(np.float32)
    want = np.clip(prod, -f.fmax32, f.fmax32).astype(f.ml_dtype).view(np.uint8)
    got = np.array([encode(v, inv) for v in vals], dtype=np.uint8)
    assert np.array_equal(got, want)
    specials = np.float32([np.nan, -np.nan, np.inf, -np.inf])
    want = [f.nan_code, f.nan_code] + ([0x7C, 0xFC] if f.has_inf else [f.nan_code] * 2)
    assert [encode(v, np.float32(1)) for v in specials] == want


@pytest.mark.parametrize("fmt", FMTS)
def test_value_decoder_matches_ml_dtypes_for_all_256_codes(fmt):
    f = kernels.fp8_format(fmt)
    _, decode = _np_codec(fmt)
    codes = np.arange(256, dtype=np.uint8)
    want = codes.view(f.ml_dtype).astype(np.float32)
    got = np.array([decode(int(c)) for c in codes], dtype=np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    ok = ~np.isnan(want)
    assert np.array_equal(got[ok].view(np.uint32), want[ok].view(np.uint32))     # signed zeros too


def test_bf16_rounding_matches_ml_dtypes():
    rng = np.random.default_rng(3)
    bits = np.concatenate([rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32),
                           np.uint32([0x3F808000, 0x3F818000, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0x00008000])])
    vals = bits.view(np.float32)
    with np.errstate(invalid="ignore"):
        want = vals.astype(bfloat16).view(np.uint16)
    got = np.array([bf16_bits_from_f32_bits(int(b)) for b in bits], dtype=np.uint16)
    finite = ~np.isnan(vals)
    assert np.array_equal(got[finite], want[finite])
    assert np.isnan(got[~finite].view(bfloat16).astype(np.float32)).all()


# ---- numba kernels vs the reference (simulator on CPU: keep sizes small) -------------------------

SIM = kernels.use_simulator_without_gpu()
pytest.importorskip("numba")


def _same_floats(a, b):
    a32, b32 = np.asarray(a).astype(np.float32), np.asarray(b).astype(np.float32)
    return np.array_equal(np.isnan(a32), np.isnan(b32)) and np.array_equal(
        a32[~np.isnan(a32)].view(np.uint32), b32[~np.isnan(b32)].view(np.uint32))


def _kernel_input(n, dtype, block, seed):
    rng = np.random.default_rng(seed)
    x = (rng.standard_t(2, n) * 2.0 ** rng.integers(-8, 8, n)).astype(np.float32)
    x[3], x[10], x[11] = np.nan, np.inf, -np.inf
    x[block: 2 * block] = 0.0
    return x.astype(dtype)


CASES = [("e4m3", 32, np.float32), ("e5m2", 256, bfloat16), ("e4m3", 128, np.float16)]
N_KERNEL = 1500 if SIM else 1 << 20      # simulator: several warp tiles and a partial one


def _to_device(xp, a):
    """Device copy (a host copy in the simulator); bfloat16 travels as its uint16 bits (CuPy has no bf16)."""
    a = a.view(np.uint16) if a.dtype == bfloat16 else a
    return xp.asarray(a) if xp is not np else a.copy()


@pytest.mark.parametrize("fmt,block,dtype", CASES)
def test_quantize_and_dequantize_kernels_bit_exact(fmt, block, dtype):
    xp, to_host = _device_module()
    from ringlab.kernels.fp8 import dequantize_device, quantize_device
    x = _kernel_input(N_KERNEL, dtype, block, 4)
    want_c, want_s = quantize_fp8_blockwise(x, fmt, block)
    codes, scales = xp.zeros(x.size, np.uint8), xp.zeros(want_s.size, np.float32)
    quantize_device(_to_device(xp, x), codes, scales, fmt, block)
    assert np.array_equal(to_host(codes), want_c)
    assert np.array_equal(to_host(scales).view(np.uint32), want_s.view(np.uint32))
    out = xp.zeros(x.size, np.float32)
    dequantize_device(codes, scales, out, fmt, block)
    assert _same_floats(to_host(out), dequantize_fp8_blockwise(want_c, want_s, fmt, block))


@pytest.mark.parametrize("fmt,block,dtype", CASES[:2])
def test_fused_hop_and_accumulate_kernels_bit_exact(fmt, block, dtype):
    xp, to_host = _device_module()
    from ringlab.kernels.fp8 import dequant_accumulate_device, dequant_add_requant_device
    local = _kernel_input(N_KERNEL, dtype, block, 5)
    peer_c, peer_s = quantize_fp8_blockwise(_kernel_input(N_KERNEL, np.float32, block, 6), fmt, block)
    out_ref = np.zeros(N_KERNEL, dtype)
    want_c, want_s = dequant_add_requant_reference(local, peer_c, peer_s, fmt, block, divide_by=4, out=out_ref)
    codes, scales = xp.zeros(N_KERNEL, np.uint8), xp.zeros(want_s.size, np.float32)
    out = _to_device(xp, np.zeros(N_KERNEL, dtype))
    dequant_add_requant_device(_to_device(xp, local), _to_device(xp, peer_c), _to_device(xp, peer_s), codes, scales,
                               fmt, block, out=out, divide_by=4)
    assert np.array_equal(to_host(codes), want_c)
    assert np.array_equal(to_host(scales), want_s)
    got_out = to_host(out)
    assert _same_floats(got_out.view(bfloat16) if dtype is bfloat16 else got_out, out_ref)
    acc = np.random.default_rng(7).standard_normal(N_KERNEL).astype(np.float32)
    acc_dev = _to_device(xp, acc)
    dequant_accumulate_device(acc_dev, _to_device(xp, peer_c), _to_device(xp, peer_s), fmt, block)
    assert _same_floats(to_host(acc_dev), dequant_accumulate_reference(acc.copy(), peer_c, peer_s, fmt, block))


@pytest.mark.parametrize("fmt,block,offset,n", [("e4m3", 64, 1, 333), ("e5m2", 128, 0, 301)])
def test_kernels_on_misaligned_and_odd_chunks(fmt, block, offset, n):
    # offset 1: the fp32 chunk is not 8-byte aligned (element-wise loads); odd n: a lone last element;
    # signed NaN peer codes and every divide_by path (1, power of two, general).
    xp, to_host = _device_module()
    from ringlab.kernels.fp8 import dequant_add_requant_device, quantize_device
    base = _kernel_input(n + offset, np.float32, block, 8)
    x = _to_device(xp, base)[offset:]
    want_c, want_s = quantize_fp8_blockwise(base[offset:], fmt, block)
    codes, scales = xp.zeros(n, np.uint8), xp.zeros(want_s.size, np.float32)
    quantize_device(x, codes, scales, fmt, block)
    assert np.array_equal(to_host(codes), want_c) and np.array_equal(to_host(scales), want_s)
    peer_c = want_c.copy()
    peer_c[[0, 7]] = 0xFF
    for divide_by in (1, 4, 3):
        out_ref = np.zeros(n, np.float32)
        hc, hs = dequant_add_requant_reference(base[offset:], peer_c, want_s, fmt, block, divide_by, out=out_ref)
        assert hc[0] == kernels.fp8_format(fmt).nan_code
        nc, ns, out = xp.zeros(n, np.uint8), xp.zeros(hs.size, np.float32), xp.zeros(n + 1, np.float32)[1:]
        dequant_add_requant_device(x, _to_device(xp, peer_c), scales, nc, ns, fmt, block, out=out,
                                   divide_by=divide_by)
        assert np.array_equal(to_host(nc), hc) and np.array_equal(to_host(ns), hs)
        assert _same_floats(to_host(out), out_ref)


def _device_module():
    """(array module, to-host function): NumPy in the simulator, CuPy on a GPU."""
    if SIM:
        return np, np.asarray
    cupy = pytest.importorskip("cupy")
    return cupy, cupy.asnumpy


# ---- the host codec works piece by piece: the bytes of one whole-chunk call -------------------------

@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("block", [32, 128])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, bfloat16])
def test_host_codec_pieces_are_bitwise_the_whole_chunk_reference(monkeypatch, fmt, block, dtype):
    """PIECE_BLOCKS bounds the codec's temporaries (peak memory); blocks are independent, so no bit may change."""
    from ringlab.kernels import codec as codec_mod
    rng = np.random.default_rng(block)
    n = 10 * block + 17                                       # several pieces and a short last block
    x = (rng.standard_normal(n) * 10.0 ** rng.uniform(-3, 3, n)).astype(dtype)
    x[block:2 * block] = 0
    x[[3, 5 * block + 1]] = np.nan
    x[7] = np.inf
    y = (rng.standard_normal(n) * 100).astype(dtype)
    whole_c, whole_s = quantize_fp8_blockwise(x, fmt, block)
    peer_c, peer_s = quantize_fp8_blockwise(y, fmt, block)
    hop_c, hop_s = dequant_add_requant_reference(x, peer_c, peer_s, fmt, block, divide_by=3)
    hop_out = np.empty(n, dtype)
    dequant_add_requant_reference(x, peer_c, peer_s, fmt, block, divide_by=3, out=hop_out)
    acc_ref = dequant_accumulate_reference(x.astype(np.float32), peer_c, peer_s, fmt, block)
    for piece_blocks in (1, 3, 128):
        monkeypatch.setattr(codec_mod, "PIECE_BLOCKS", piece_blocks)
        codec = codec_mod.HostFp8Codec(fmt, block)
        msg, peer, new = codec.message(n), codec.message(n), codec.message(n)
        codec.quantize(x, msg)
        codes, scales = split_fp8_message(msg, n, block)
        assert np.array_equal(codes, whole_c) and np.array_equal(scales.view(np.uint32), whole_s.view(np.uint32))
        decoded = np.empty(n, dtype)
        codec.dequantize(msg, decoded)
        ref = dequantize_fp8_blockwise(whole_c, whole_s, fmt, block, dtype=dtype)
        assert np.array_equal(decoded.view(np.uint8), np.asarray(ref, dtype).view(np.uint8))
        codec.quantize(y, peer)
        out = np.empty(n, dtype)
        codec.hop(x, peer, new, out=out, divide_by=3)
        codes, scales = split_fp8_message(new, n, block)
        assert np.array_equal(codes, hop_c) and np.array_equal(scales.view(np.uint32), hop_s.view(np.uint32))
        assert np.array_equal(out.view(np.uint8), hop_out.view(np.uint8))
        into = np.empty(n, dtype)
        acc = codec.accumulator(x, into)
        assert (acc is into) == (dtype == np.float32) and acc.dtype == np.float32
        codec.accumulate(acc, peer)
        assert np.array_equal(acc.view(np.uint32), acc_ref.view(np.uint32))
