"""Instructions numba does not expose, as numba intrinsics, each with a plain-Python twin for the simulator."""
# - ``load4(a, q)`` / ``store4(a, q, v0, v1, v2, v3)``: elements 4q..4q+3 of a 1-D array in ONE vector
#   access (16 bytes for fp32, 8 for 16-bit types): numba's own indexing does one scalar access per
#   element plus a negative-index fix-up, which costs the FP8 kernels more instructions than their
#   arithmetic. The caller guarantees the alignment (``aligned4``) and the bounds.
# - ``load_u8x4(a, q)`` / ``store_u8x4(a, q, word)``: four FP8 codes as one little-endian uint32.
# - ``fp8x4_encoder(fmt)``: four finite fp32 values -> four FP8 codes (uint32) by the GPU's conversion
#   instruction (``cvt.rn.satfinite.e4m3x2.f32``, sm_89+): RNE, finite overflow saturates to +-fmax.
# - ``fp8x4_decoder(fmt)``: four codes -> four exact fp32 values (FP8 -> f16x2 -> f32, both exact).
# - ``bf16_rounder()``: fp32 -> bfloat16 bits, round to nearest even, by ``cvt.rn.bf16.f32`` (sm_80+);
#   NaN keeps its sign and becomes quiet (ml_dtypes' bits, not the instruction's canonical NaN).
# - ``fmax_nan_ignoring(a, b)``: ``max.f32``, which returns the other operand when one is NaN.
# - ``shfl_xor_fmax(v, offset)``: that max of ``v`` and lane ``lane ^ offset``'s ``v`` (a warp shuffle).
# - ``any_lane(p)``: a warp vote.
#
# The simulator has no warp shuffle or vote: it exchanges through shared memory and votes over the CUDA
# block (a superset of the warp), so every thread of a block must call these equally often: the FP8
# kernels' loops are block-uniform for this reason.

import numpy as np

from ringlab.kernels.device import SIMULATED, cuda, data_address, device_fn, f32_bits
from ringlab.kernels.fp8_bits import bf16_bits_from_f32_bits

__all__ = ["load4", "store4", "scalar_load4", "scalar_store4", "scalar_load_u8x4", "scalar_store_u8x4", "load_u8x4", "store_u8x4", "fp8x4_encoder", "fp8x4_decoder", "bf16_rounder",
           "fmax_nan_ignoring", "shfl_xor_fmax", "any_lane", "aligned4"]


def aligned4(a):
    """True when a's data address allows ``load4``/``store4`` (4 elements, one vector access)."""
    return data_address(a) % (4 * a.dtype.itemsize) == 0


def _scalar_load4(a, q):
    i = 4 * q
    return a[i], a[i + 1], a[i + 2], a[i + 3]


def _scalar_store4(a, q, v0, v1, v2, v3):
    i = 4 * q
    a[i], a[i + 1], a[i + 2], a[i + 3] = v0, v1, v2, v3


def _scalar_load_u8x4(a, q):
    i = 4 * q
    return np.int64(a[i]) | (np.int64(a[i + 1]) << 8) | (np.int64(a[i + 2]) << 16) | (np.int64(a[i + 3]) << 24)


def _scalar_store_u8x4(a, q, w):
    i = 4 * q
    a[i] = w & 0xFF
    a[i + 1] = (w >> 8) & 0xFF
    a[i + 2] = (w >> 16) & 0xFF
    a[i + 3] = (w >> 24) & 0xFF


# The same accesses element by element: any alignment (and the simulator's load4, store4, ...).
scalar_load4, scalar_store4, scalar_load_u8x4, scalar_store_u8x4 = (
    cuda.jit(device=True)(f) for f in (_scalar_load4, _scalar_store4, _scalar_load_u8x4, _scalar_store_u8x4))

if SIMULATED:
    def _fmax(a, b):
        return np.fmax(np.float32(a), np.float32(b))

    def _shfl_xor_fmax(v, offset):
        sh = cuda.shared.array(1024, np.float32)
        t = cuda.threadIdx.x
        cuda.syncthreads()
        sh[t] = v
        cuda.syncthreads()
        return np.fmax(np.float32(v), sh[t ^ offset])

    def _any_lane(p):
        return cuda.syncthreads_or(1 if p else 0) != 0

    load4, store4, load_u8x4, store_u8x4 = scalar_load4, scalar_store4, scalar_load_u8x4, scalar_store_u8x4
    fmax_nan_ignoring, shfl_xor_fmax, any_lane = (
        cuda.jit(device=True)(f) for f in (_fmax, _shfl_xor_fmax, _any_lane))
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda import libdevice
    from numba.cuda.extending import intrinsic

    def _vector_pointer(context, builder, sig, args, lanes_type):
        """Pointer to element 4q of the array, cast to ``lanes_type*`` (no negative-index fix-up)."""
        ary = context.make_array(sig.args[0])(context, builder, args[0])
        q = context.cast(builder, args[1], sig.args[1], types.int64)
        ptr = builder.gep(ary.data, [builder.mul(q, ir.Constant(ir.IntType(64), 4))])
        return builder.bitcast(ptr, lanes_type.as_pointer())

    @intrinsic
    def load4(typingctx, a, q):
        ret = types.UniTuple(a.dtype, 4)

        def codegen(context, builder, sig, args):
            elt = context.get_value_type(sig.args[0].dtype)
            v = builder.load(_vector_pointer(context, builder, sig, args, ir.VectorType(elt, 4)),
                             align=4 * sig.args[0].dtype.bitwidth // 8)
            return context.make_tuple(builder, ret, [builder.extract_element(v, ir.Constant(ir.IntType(32), k))
                                                     for k in range(4)])
        return ret(a, q), codegen

    @intrinsic
    def store4(typingctx, a, q, v0, v1, v2, v3):
        def codegen(context, builder, sig, args):
            dt = sig.args[0].dtype
            vec = ir.VectorType(context.get_value_type(dt), 4)
            v = ir.Constant(vec, ir.Undefined)
            for k in range(4):
                v = builder.insert_element(v, context.cast(builder, args[2 + k], sig.args[2 + k], dt),
                                           ir.Constant(ir.IntType(32), k))
            builder.store(v, _vector_pointer(context, builder, sig, args, vec), align=4 * dt.bitwidth // 8)
            return context.get_dummy_value()
        return types.void(a, q, v0, v1, v2, v3), codegen

    @intrinsic
    def load_u8x4(typingctx, a, q):
        def codegen(context, builder, sig, args):
            return builder.load(_vector_pointer(context, builder, sig, args, ir.IntType(32)), align=4)
        return types.uint32(a, q), codegen

    @intrinsic
    def store_u8x4(typingctx, a, q, w):
        def codegen(context, builder, sig, args):
            word = context.cast(builder, args[2], sig.args[2], types.uint32)
            builder.store(word, _vector_pointer(context, builder, sig, args, ir.IntType(32)), align=4)
            return context.get_dummy_value()
        return types.void(a, q, w), codegen

    @cuda.jit(device=True)
    def fmax_nan_ignoring(a, b):
        return libdevice.fmaxf(a, b)

    @cuda.jit(device=True)
    def shfl_xor_fmax(v, offset):
        return libdevice.fmaxf(v, cuda.shfl_xor_sync(0xFFFFFFFF, v, offset))

    @cuda.jit(device=True)
    def any_lane(p):
        return cuda.any_sync(0xFFFFFFFF, p)


_encoders, _decoders = {}, {}


def fp8x4_encoder(fmt_name):
    """Device function ``enc(a, b, c, d) -> uint32``: four finite fp32 values rounded to nearest even into
    FP8 codes (``a`` in the low byte), saturating at +-fmax. NaN/inf follow the project's policy in the
    caller: the instruction's own NaN code and its saturation of inf are not the policy's."""
    if fmt_name not in _encoders:
        ptx = ("{ .reg .b16 lo, hi;\n"
               f" cvt.rn.satfinite.{fmt_name}x2.f32 lo, $2, $1;\n"    # second operand -> low byte
               f" cvt.rn.satfinite.{fmt_name}x2.f32 hi, $4, $3;\n"
               " mov.b32 $0, {lo, hi}; }")

        @intrinsic
        def enc(typingctx, a, b, c, d):
            def codegen(context, builder, sig, args):
                f32 = ir.FloatType()
                fnty = ir.FunctionType(ir.IntType(32), [f32] * 4)
                vals = [context.cast(builder, v, t, types.float32) for v, t in zip(args, sig.args)]
                return builder.call(ir.InlineAsm(fnty, ptx, "=r,f,f,f,f"), vals)
            return types.uint32(a, b, c, d), codegen
        _encoders[fmt_name] = enc
    return _encoders[fmt_name]


def fp8x4_decoder(fmt_name):
    """Device function ``dec(word) -> (fp32,) * 4``: the exact values of four FP8 codes (low byte first).
    NaN codes give a NaN of unspecified sign and payload, E5M2's inf codes +-inf."""
    if fmt_name not in _decoders:
        ptx = ("{ .reg .b16 lo, hi, e0, e1, e2, e3; .reg .b32 h01, h23;\n"
               " mov.b32 {lo, hi}, $4;\n"
               f" cvt.rn.f16x2.{fmt_name}x2 h01, lo;\n"
               f" cvt.rn.f16x2.{fmt_name}x2 h23, hi;\n"
               " mov.b32 {e0, e1}, h01;\n mov.b32 {e2, e3}, h23;\n"
               " cvt.f32.f16 $0, e0;\n cvt.f32.f16 $1, e1;\n cvt.f32.f16 $2, e2;\n cvt.f32.f16 $3, e3; }")

        @intrinsic
        def dec(typingctx, word):
            ret = types.UniTuple(types.float32, 4)

            def codegen(context, builder, sig, args):
                f32 = ir.FloatType()
                fnty = ir.FunctionType(ir.LiteralStructType([f32] * 4), [ir.IntType(32)])
                w = context.cast(builder, args[0], sig.args[0], types.uint32)
                quad = builder.call(ir.InlineAsm(fnty, ptx, "=f,=f,=f,=f,r"), [w])
                return context.make_tuple(builder, ret, [builder.extract_value(quad, k) for k in range(4)])
            return ret(word), codegen
        _decoders[fmt_name] = dec
    return _decoders[fmt_name]


_bf16 = []


def bf16_rounder():
    """Device function ``round(v) -> bf16 bits`` (RNE): the GPU's ``cvt.rn.bf16.f32`` on sm_80 and newer
    (one instruction instead of a dozen integer ops), else fp8_bits.bf16_bits_from_f32_bits. A NaN takes
    the software path either way, so the bits are ml_dtypes' on every device."""
    if not _bf16:
        software = device_fn(bf16_bits_from_f32_bits)

        def round_software(v):
            return software(f32_bits(v))
        if SIMULATED or tuple(cuda.get_current_device().compute_capability) < (8, 0):
            _bf16.append(device_fn(round_software))
        else:
            @intrinsic
            def cvt_bf16(typingctx, v):
                def codegen(context, builder, sig, args):
                    fnty = ir.FunctionType(ir.IntType(16), [ir.FloatType()])
                    return builder.call(ir.InlineAsm(fnty, "cvt.rn.bf16.f32 $0, $1;", "=h,f"), args)
                return types.uint16(types.float32), codegen

            def round_hardware(v):
                if v != v:
                    return software(f32_bits(v))
                return np.int64(cvt_bf16(np.float32(v)))
            _bf16.append(device_fn(round_hardware))
    return _bf16[0]
