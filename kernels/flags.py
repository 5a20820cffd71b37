"""Raw-address loads/stores and system-scope flags (inline PTX acquire/release, %globaltimer) for the ring kernel.

The simulator has no addresses: ``register(array)`` maps an array's data address to it and the twins index it
(the GIL makes every access sequentially consistent, stronger than acquire/release).
"""
import time

import numpy as np

from ringlab.kernels.device import SIMULATED, cuda, data_address

__all__ = ["flag_load", "flag_store", "flag_access", "FLAG_SCOPES", "global_ns", "pointer_access", "quad_access",
           "prefetch_l2", "register", "unregister"]

FLAG_SCOPES = ("sys", "gpu")    # sys: peers on other GPUs or the host; gpu: every peer runs on this GPU

# flag_load(base, i):     ld.acquire.sys.global.u64 of word i at base (a peer's counter in IPC memory)
# flag_store(base, i, v): fence.acq_rel.sys; st.release.sys.global.u64: publishes every write this thread has
#                         observed (its block's, after a barrier) before the flag, to every process
# flag_access(scope):     (load, store) of that scope: "gpu" suffices, and fences far cheaper, when every peer
#                         kernel runs on the same GPU (ranks sharing it under MPS); "sys" for other GPUs / the host
# global_ns():            %globaltimer in ns, one clock for all contexts on a GPU (bounded spins, traces)
# pointer_access(dtype) / quad_access(dtype): element i / elements 4q..4q+3 of a dtype array at an address
# prefetch_l2(base, off): prefetch.global.L2 of the line holding byte base + off (a hint: no register, no bits;
#                         callers stay inside data a flag has already published, and inside the buffer)
_MEMORY = {}          # simulator only: data address -> the array living there


def register(array):
    """Make ``array`` reachable by its address in simulated kernels (a no-op on the GPU); returns the address."""
    addr = data_address(array)
    if SIMULATED:
        _MEMORY[addr] = array.reshape(-1)     # flat: kernels index elements
    return addr


def unregister(array):
    _MEMORY.pop(data_address(array), None)


_access = {}

if SIMULATED:
    def _flag_load(base, i):
        time.sleep(0)                        # a spin: let the other simulated ranks' threads run
        return np.uint64(_MEMORY[base][i])

    def _flag_store(base, i, v):
        _MEMORY[base][i] = v

    def _global_ns():
        return np.uint64(time.monotonic_ns())

    PREFETCHED = []                          # simulator: (base, off) of every prefetch, for tests

    def _prefetch_l2(base, off):
        """No cache to fill: check the line is inside the buffer (a GPU prefetch past it could fault), record it."""
        if not 0 <= int(off) < _MEMORY[base].nbytes:
            raise IndexError(f"prefetch at byte {int(off)} of a {_MEMORY[base].nbytes}-byte buffer")
        PREFETCHED.append((int(base), int(off)))

    flag_load, flag_store, global_ns, prefetch_l2 = (cuda.jit(device=True)(f) for f in (_flag_load, _flag_store,
                                                                                          _global_ns, _prefetch_l2))

    def flag_access(scope):
        """(load, store) flags of ``scope`` (the simulator's accesses are stronger than any scope)."""
        if scope not in FLAG_SCOPES:
            raise ValueError(f"flag scope must be one of {FLAG_SCOPES}, got {scope!r}")
        return flag_load, flag_store

    def pointer_access(dtype):
        """(load, store) device functions for ``dtype`` elements at an address (simulator: registry)."""
        def load(base, i):
            return _MEMORY[base][i]

        def store(base, i, v):
            _MEMORY[base][i] = v
        return cuda.jit(device=True)(load), cuda.jit(device=True)(store)

    def quad_access(dtype):
        """(load4, store4): elements 4q..4q+3 at an address (simulator: four scalar accesses)."""
        def load4(base, q):
            a = _MEMORY[base]
            return a[4 * q], a[4 * q + 1], a[4 * q + 2], a[4 * q + 3]

        def store4(base, q, v0, v1, v2, v3):
            a = _MEMORY[base]
            a[4 * q], a[4 * q + 1], a[4 * q + 2], a[4 * q + 3] = v0, v1, v2, v3
        return cuda.jit(device=True)(load4), cuda.jit(device=True)(store4)
else:
    from llvmlite import ir
    from numba import types
    from numba.cuda.extending import intrinsic
    from numba.np import numpy_support

    _I64 = ir.IntType(64)

    def _element_pointer(context, builder, sig, args, elt):
        addr = context.cast(builder, args[0], sig.args[0], types.uint64)
        i = context.cast(builder, args[1], sig.args[1], types.int64)
        return builder.gep(builder.inttoptr(addr, elt.as_pointer()), [i])

    def _scoped_flags(scope):
        @intrinsic
        def load(typingctx, base, i):
            def codegen(context, builder, sig, args):
                ptr = builder.ptrtoint(_element_pointer(context, builder, sig, args, _I64), _I64)
                asm = ir.InlineAsm(ir.FunctionType(_I64, [_I64]), f"ld.acquire.{scope}.global.u64 $0, [$1];",
                                   "=l,l,~{memory}", side_effect=True)
                return builder.call(asm, [ptr])
            return types.uint64(base, i), codegen

        @intrinsic
        def store(typingctx, base, i, v):
            def codegen(context, builder, sig, args):
                ptr = builder.ptrtoint(_element_pointer(context, builder, sig, args, _I64), _I64)
                val = context.cast(builder, args[2], sig.args[2], types.uint64)
                asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_I64, _I64]),
                                   f"fence.acq_rel.{scope};\n\tst.release.{scope}.global.u64 [$0], $1;",
                                   "l,l,~{memory}", side_effect=True)
                builder.call(asm, [ptr, val])
                return context.get_dummy_value()
            return types.void(base, i, v), codegen
        return load, store

    _FLAGS = {scope: _scoped_flags(scope) for scope in FLAG_SCOPES}
    flag_load, flag_store = _FLAGS["sys"]

    def flag_access(scope):
        """(load, store) intrinsics: acquire load / fence + release store at ``scope`` ("sys" or "gpu")."""
        if scope not in FLAG_SCOPES:
            raise ValueError(f"flag scope must be one of {FLAG_SCOPES}, got {scope!r}")
        return _FLAGS[scope]

    @intrinsic
    def global_ns(typingctx):
        def codegen(context, builder, sig, args):
            asm = ir.InlineAsm(ir.FunctionType(_I64, []), "mov.u64 $0, %globaltimer;", "=l", side_effect=True)
            return builder.call(asm, [])
        return types.uint64(), codegen

    @intrinsic
    def prefetch_l2(typingctx, base, off):
        def codegen(context, builder, sig, args):
            addr = builder.add(context.cast(builder, args[0], sig.args[0], types.uint64),
                               context.cast(builder, args[1], sig.args[1], types.uint64))
            asm = ir.InlineAsm(ir.FunctionType(ir.VoidType(), [_I64]), "prefetch.global.L2 [$0];", "l",
                               side_effect=True)
            builder.call(asm, [addr])
            return context.get_dummy_value()
        return types.void(base, off), codegen

    def pointer_access(dtype):
        """(load, store) intrinsics for ``dtype`` elements at an address: plain global accesses, ordered
        against the flags by the flags' memory clobber."""
        dtype = np.dtype(dtype)
        if dtype in _access:
            return _access[dtype]
        nt = numpy_support.from_dtype(dtype)

        @intrinsic
        def load(typingctx, base, i):
            def codegen(context, builder, sig, args):
                elt = context.get_value_type(nt)
                return builder.load(_element_pointer(context, builder, sig, args, elt), align=dtype.itemsize)
            return nt(base, i), codegen

        @intrinsic
        def store(typingctx, base, i, v):
            def codegen(context, builder, sig, args):
                elt = context.get_value_type(nt)
                val = context.cast(builder, args[2], sig.args[2], nt)
                builder.store(val, _element_pointer(context, builder, sig, args, elt), align=dtype.itemsize)
                return context.get_dummy_value()
            return types.void(base, i, v), codegen
        _access[dtype] = (load, store)
        return _access[dtype]

    _quads = {}

    def quad_access(dtype):
        """(load4, store4) intrinsics: elements 4q..4q+3 at a 16-byte aligned address, one vector access."""
        dtype = np.dtype(dtype)
        if dtype in _quads:
            return _quads[dtype]
        nt = numpy_support.from_dtype(dtype)
        align = min(16, 4 * dtype.itemsize)

        def quad_pointer(context, builder, sig, args):
            vec = ir.VectorType(context.get_value_type(nt), 4)
            addr = context.cast(builder, args[0], sig.args[0], types.uint64)
            q = context.cast(builder, args[1], sig.args[1], types.int64)
            return builder.gep(builder.inttoptr(addr, vec.as_pointer()), [q]), vec

        @intrinsic
        def load4(typingctx, base, q):
            ret = types.UniTuple(nt, 4)

            def codegen(context, builder, sig, args):
                ptr, _ = quad_pointer(context, builder, sig, args)
                v = builder.load(ptr, align=align)
                return context.make_tuple(builder, ret, [builder.extract_element(v, ir.Constant(ir.IntType(32), k))
                                                         for k in range(4)])
            return ret(base, q), codegen

        @intrinsic
        def store4(typingctx, base, q, v0, v1, v2, v3):
            def codegen(context, builder, sig, args):
                ptr, vec = quad_pointer(context, builder, sig, args)
                v = ir.Constant(vec, ir.Undefined)
                for k in range(4):
                    v = builder.insert_element(v, context.cast(builder, args[2 + k], sig.args[2 + k], nt),
                                               ir.Constant(ir.IntType(32), k))
                builder.store(v, ptr, align=align)
                return context.get_dummy_value()
            return types.void(base, q, v0, v1, v2, v3), codegen
        _quads[dtype] = (load4, store4)
        return _quads[dtype]
