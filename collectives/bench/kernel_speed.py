"""GPU kernel speed cases for collectives/bench/harness.py: each kernel's GB/s (bytes read + written) beside a
device copy, and torch's FP8 casts as peers. Needs CuPy and a GPU; torch is optional."""
# Every case is checked before it is timed: #wrong counts elements that differ from the NumPy
# reference (bit for bit for our kernels; against ml_dtypes' cast for torch's, which does not saturate).

import functools
from dataclasses import replace

import numpy as np

from ringlab.bench.harness import Case, Unavailable, Variant

from ringlab.kernels.formats import fp8_format
from ringlab.kernels.reference import (dequant_accumulate_reference, dequant_add_requant_reference, dequantize_fp8_blockwise,
                        quantize_fp8_blockwise, reduce_reference)

__all__ = ["kernel_speed_variants", "torch_unavailable_reason"]


def torch_unavailable_reason():
    """None if torch with CUDA and float8_e4m3fn is usable, else why not (printed as n/a)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    if not hasattr(torch, "float8_e4m3fn"):
        return f"torch {torch.__version__} has no float8_e4m3fn"
    return None


def _mismatches(got, want):
    """Elements whose bits differ (compared as unsigned ints of the element size)."""
    got, want = np.asarray(got), np.asarray(want)
    bits = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[want.dtype.itemsize]
    return int(np.count_nonzero(got.view(bits) != want.view(bits)))


def kernel_speed_variants(fmt="e4m3", block=128, seed=0, queued=10):
    """bench Variants (collective 'sendrecv': busbw = algbw) for count fp32 elements each.

    Kernels are timed as ``queued`` back-to-back launches behind a spin kernel (bench.Case), i.e.
    device time without Python's launch overhead; the "(one call)" rows time a single call with
    events around it, launch overhead included."""
    import cupy

    from ringlab.kernels import fp8 as kfp8
    from ringlab.kernels.reduce import reduce_device
    f = fp8_format(fmt)
    stream = cupy.cuda.get_current_stream()
    sync = stream.synchronize

    def data(count, offset=0):
        rng = np.random.default_rng(seed + offset)
        return rng.standard_normal(count, dtype=np.float32)

    @functools.lru_cache(maxsize=None)
    def quantized(count, offset):
        """(data, codes, scales) by the NumPy reference: computed once for all launch variants."""
        x = data(count, offset)
        return (x,) + quantize_fp8_blockwise(x, f, block)

    @functools.lru_cache(maxsize=None)
    def hop_reference(count):
        hl = data(count, 3)
        _, pc, ps = quantized(count, 4)
        return (hl, pc, ps) + dequant_add_requant_reference(hl, pc, ps, f, block)

    def copy(count, dtype, op):
        x = cupy.asarray(data(count))
        y = cupy.empty_like(x)
        return Case(run=lambda: cupy.copyto(y, x), wrong=lambda: int((y != x).sum()), sync=sync, stream=stream, queued=queued,
                    nbytes=8 * count)

    def reduce_case(kind):
        def prepare(count, dtype, op):
            ha, hb = data(count, 1), data(count, 2)
            if kind == "bf16":
                from ml_dtypes import bfloat16
                ha, hb = ha.astype(bfloat16), hb.astype(bfloat16)
            want = reduce_reference(ha, hb, "sum")
            view = (lambda h: h.view(np.uint16)) if kind == "bf16" else (lambda h: h)
            a, b = cupy.asarray(view(ha)), cupy.asarray(view(hb))
            c = cupy.empty_like(a)
            return Case(run=lambda: reduce_device(a, b, "sum", out=c),
                        wrong=lambda: _mismatches(cupy.asnumpy(c), view(want)),
                        sync=sync, stream=stream, queued=queued, nbytes=3 * ha.itemsize * count)
        return prepare

    def quantize(variant):
        def prepare(count, dtype, op):
            hx, wc, ws = quantized(count, 0)
            x = cupy.asarray(hx)
            c, s = cupy.empty(count, np.uint8), cupy.empty(ws.size, np.float32)
            return Case(run=lambda: kfp8.quantize_device(x, c, s, f, block, variant=variant),
                        wrong=lambda: _mismatches(cupy.asnumpy(c), wc) + _mismatches(cupy.asnumpy(s), ws),
                        sync=sync, stream=stream, queued=queued, nbytes=4 * count + count + 4 * ws.size)
        return prepare

    def dequantize(variant):
        def prepare(count, dtype, op):
            _, wc, ws = quantized(count, 0)
            want = dequantize_fp8_blockwise(wc, ws, f, block)
            c, s, y = cupy.asarray(wc), cupy.asarray(ws), cupy.empty(count, np.float32)
            return Case(run=lambda: kfp8.dequantize_device(c, s, y, f, block, variant=variant),
                        wrong=lambda: _mismatches(cupy.asnumpy(y), want),
                        sync=sync, stream=stream, queued=queued, nbytes=count + 4 * ws.size + 4 * count)
        return prepare

    def hop(variant):
        def prepare(count, dtype, op):
            hl, pc, ps, wc, ws = hop_reference(count)
            loc, c, s = cupy.asarray(hl), cupy.asarray(pc), cupy.asarray(ps)
            nc, ns = cupy.empty_like(c), cupy.empty_like(s)
            return Case(run=lambda: kfp8.dequant_add_requant_device(loc, c, s, nc, ns, f, block, variant=variant),
                        wrong=lambda: _mismatches(cupy.asnumpy(nc), wc) + _mismatches(cupy.asnumpy(ns), ws),
                        sync=sync, stream=stream, queued=queued, nbytes=4 * count + 2 * (count + 4 * ws.size))
        return prepare

    def accumulate(variant):
        def prepare(count, dtype, op):
            _, wc, ws = quantized(count, 0)
            acc0 = data(count, 5)
            want = dequant_accumulate_reference(acc0.copy(), wc, ws, f, block)    # bench checks after one run
            c, s, acc = cupy.asarray(wc), cupy.asarray(ws), cupy.asarray(acc0)
            return Case(run=lambda: kfp8.dequant_accumulate_device(acc, c, s, f, block, variant=variant),
                        wrong=lambda: _mismatches(cupy.asnumpy(acc), want),
                        sync=sync, stream=stream, queued=queued, nbytes=count + 4 * ws.size + 8 * count)
        return prepare

    def torch_case(scaled, with_amax=False):
        def prepare(count, dtype, op):
            why = torch_unavailable_reason()
            if why:
                raise Unavailable(why)
            import torch
            hx = data(count)
            x = torch.as_tensor(hx, device="cuda")
            nb = -(-count // block)
            if scaled:
                if count % block:
                    raise Unavailable(f"count not a multiple of block {block}")
                xb = x.view(nb, block)
                scales = (xb.abs().amax(dim=1, keepdim=True) / f.fmax)
                out = {}

                def run():
                    s = (xb.abs().amax(dim=1, keepdim=True) / f.fmax) if with_amax else scales
                    out["y"] = (xb / s).to(torch.float8_e4m3fn)
                want = np.clip(hx.reshape(nb, block) / scales.cpu().numpy(), -f.fmax, f.fmax).astype(
                    fp8_format("e4m3").ml_dtype)
            else:
                out = {}

                def run():
                    out["y"] = x.to(torch.float8_e4m3fn)
                want = hx.astype(fp8_format("e4m3").ml_dtype)
            return Case(run=run, wrong=lambda: _mismatches(out["y"].view(torch.uint8).cpu().numpy(), want),
                        sync=torch.cuda.synchronize, stream=stream, queued=queued,
                        nbytes=4 * count + count + (4 * nb if scaled else 0))
        return prepare

    def one_call(prepare):
        return lambda *args: replace(prepare(*args), queued=0)

    return [Variant("device copy", copy, "sendrecv"),
            Variant("reduce f32 sum", reduce_case("f32"), "sendrecv"),
            Variant("reduce bf16 sum", reduce_case("bf16"), "sendrecv"),
            *[Variant(f"quantize {f.name} {v}", quantize(v), "sendrecv") for v in kfp8.VARIANTS],
            *[Variant(f"dequantize {f.name} {v}", dequantize(v), "sendrecv") for v in kfp8.VARIANTS],
            *[Variant(f"hop {f.name} {v}", hop(v), "sendrecv") for v in kfp8.VARIANTS],
            *[Variant(f"accumulate {f.name} {v}", accumulate(v), "sendrecv") for v in kfp8.VARIANTS],
            Variant(f"quantize {f.name} (one call)", one_call(quantize(None)), "sendrecv"),
            Variant(f"hop {f.name} (one call)", one_call(hop(None)), "sendrecv"),
            Variant("torch cast", torch_case(False), "sendrecv"),
            Variant("torch scale+cast", torch_case(True), "sendrecv"),
            Variant("torch amax+scale+cast", torch_case(True, True), "sendrecv")]
