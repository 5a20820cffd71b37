"""The persistent ring kernel: one launch walks a rank's primitive program on the GPU (docs/device_ring.md).

Pull form: recv_* wait (acquire) on the left's counter, read its chunk over CUDA IPC, publish (release) on
their own; block p owns part p of every chunk, counters count slices. The codec is a compile-time parameter.
"""

import numpy as np

from ringlab.kernels.device import SIMULATED, cuda
from ringlab.kernels.flags import FLAG_SCOPES, flag_access, flag_store, global_ns, pointer_access
from ringlab.kernels.formats import check_block, check_fp8_input_dtype, fp8_format
from ringlab.kernels.optable import DEVICE_DTYPES, OPS
from ringlab.kernels.ring_identity import combine_function as _combine, identity_moves
from ringlab.kernels.ring_layout import (IDENTITY, Codec, ALIGNED, CALLS, CHUNK_BLOCKS, FINAL, FIRST_CHUNK, FIRST_HI, FIRST_LO,
                                         FROM_SRC, LEFT, LEFT_CODES, LEFT_FLAGS, LEFT_OUT, LEFT_SCALES, LEFT_SRC,
                                         MAX_PARTS, MAX_RANKS_PER_LAUNCH, MAX_SLICES, MY_FLAGS, NRANKS, OUT, PROG_COLS,
                                         REDUCE, RIGHT, RIGHT_FLAGS, SEND_CODES, SEND_SCALES, SLICE_STRIDE, SRC, STAGE_COUNT,
                                         STAGE_IN, STAGE_OUT, STATUS, STATUS_OK, STATUS_TIMEOUT, TABLE_COLS, TRACE, check_int)

__all__ = ["Codec", "IDENTITY", "fp8_codec", "ring_kernel", "TABLE_COLS", "PROG_COLS", "SLICE_STRIDE", "MAX_SLICES",
           "STATUS_OK", "STATUS_TIMEOUT", "MAX_PARTS", "REDUCE", "FROM_SRC", "FINAL", "KERNEL_DTYPES", "KERNEL_OPS",
           "codec_dtypes", "check_group"]

KERNEL_DTYPES, KERNEL_OPS = DEVICE_DTYPES, OPS     # identity codec: from the one op/dtype table
_ = (SIMULATED, ALIGNED, CALLS, LEFT, NRANKS, OUT, RIGHT, SRC, MAX_RANKS_PER_LAUNCH, _combine)   # re-exported


# Codec and IDENTITY live in ring_layout.py (the FP8 codec subclasses Codec without importing this module)


def fp8_codec(fmt="e4m3", block=128):
    """The FP8 codec for ``fmt`` ("e4m3" / "e5m2") and ``block`` elements per scale (clear errors otherwise)."""
    return Codec("fp8", fp8_format(fmt).name, check_block(block))


def codec_dtypes(codec):
    """(dtypes, ops) the kernel of ``codec`` takes."""
    if codec == IDENTITY:
        return KERNEL_DTYPES, KERNEL_OPS
    from ringlab.kernels.fp8_ring_codec import FP8_KERNEL_DTYPES, FP8_KERNEL_OPS
    return FP8_KERNEL_DTYPES, FP8_KERNEL_OPS


_kernels = {}
_SIGNATURE = "void(uint64, uint64, int64, int64, uint64)"


if SIMULATED:
    def _rank_barrier():
        pass                                       # one thread per rank: nothing to wait for
    rank_barrier = cuda.jit(device=True)(_rank_barrier)
else:
    @cuda.jit(device=True)
    def rank_barrier():
        cuda.syncthreads()                         # a rank's part = one CUDA block


def ring_kernel(dtype, op, codec=IDENTITY, scope="sys", max_registers=None, group=0):
    """The compiled persistent kernel for (dtype, op, codec, flag scope). Parameters: table and program
    addresses, nprims (2N-1), slices K, timeout_ns (0: no limit). No per-call parameter: a block counts its
    calls on the device (calls[p]), so a CUDA graph replays it correctly. ``scope`` "gpu" when every rank runs
    on this GPU; ``max_registers`` caps registers per thread (more threads per block); ``group``: the walk's
    order (check_group)."""
    key = (np.dtype(dtype).name, op, codec, scope, max_registers, check_group(group))
    if key not in _kernels:
        options = {} if max_registers is None else {"max_registers": int(max_registers)}
        _kernels[key] = cuda.jit(_SIGNATURE, **options)(ring_kernel_source(dtype, op, codec, scope, group))
    return _kernels[key]


def check_group(group):
    """Slices per group G of the walk: for each group of G slices, every primitive over those slices, as NCCL's
    loop over the buffer runs every step on one piece (the left's output is read one group later, while it may
    still be in L2). 0: one group of every slice (each primitive over the whole chunk before the next)."""
    return check_int("group (slices per group)", group, 0, SLICE_STRIDE)


def _moves(dtype, op, codec):
    name = np.dtype(dtype).name
    dtypes, ops = codec_dtypes(codec)
    if codec.name not in ("identity", "fp8"):
        raise NotImplementedError(f"codec {codec.name!r}: the ring kernel knows identity and fp8")
    if codec.name == "fp8":
        check_fp8_input_dtype(dtype)                  # integers: the project's clear TypeError
        if op not in ops:
            raise ValueError(f"FP8 all-reduce supports op {' or '.join(ops)}, got {op!r}")
    if name not in dtypes or op not in ops:
        raise TypeError(f"the device ring has no {codec.name} kernel for {name} {op}; supported: "
                        f"{', '.join(dtypes)} with {', '.join(ops)}")
    if codec == IDENTITY:
        return identity_moves(dtype, op)
    from ringlab.kernels.fp8_ring_codec import fp8_moves
    return fp8_moves(dtype, op, codec)


def ring_kernel_source(dtype, op, codec=IDENTITY, scope="sys", group=0):
    """The kernel as a Python function, before compilation (for ``cuda.compile_ptx`` checks)."""
    group = check_group(group)
    if scope not in FLAG_SCOPES:
        raise ValueError(f"flag scope must be one of {FLAG_SCOPES}, got {scope!r}")
    moves = _moves(dtype, op, codec)
    first, step = moves.first, moves.step
    has_first, codec_cols = moves.has_first, moves.uses_codec_columns     # compile-time constants
    can_stage = codec == IDENTITY
    copy, part = (moves.copy, moves.part) if can_stage else (None, None)
    addr_load, _ = pointer_access(np.int64)
    flag_load, flag_put = flag_access(scope)         # the counters; status (host memory) stays sys
    _, trace_put = pointer_access(np.uint64)         # traces: plain stores, read by the host after a sync

    @cuda.jit(device=True)
    def stage_copy(fr, to, prog, y, nprims, lo0, hi0, nslices, p, nparts, lane, nlanes):
        """Part p of every chunk (primitive 0's, then primitives 1..N-1's), every slice: to = fr."""
        n = (nprims + 1) // 2
        for i in range(n):
            lo, hi = lo0, hi0
            if i > 0:
                e = (y * (nprims - 1) + i - 1) * PROG_COLS
                lo, hi = addr_load(prog, e), addr_load(prog, e + 1)
            for k in range(nslices):
                a, b = part(lo, hi, k, nslices, p, nparts)
                copy(fr, to, a, b, lane, nlanes)

    @cuda.jit(device=True)
    def wait_geq(flags, p, target, deadline, status, peer, prim):
        """Lane 0 spins (acquire) until flags[p] >= target; on timeout it records who stalled. 1 = ok."""
        while flag_load(flags, p) < target:
            if deadline != 0 and global_ns() > deadline:
                flag_store(status, 2, np.uint64(prim))
                flag_store(status, 1, np.uint64(peer))
                flag_store(status, 0, np.uint64(STATUS_TIMEOUT))
                return 0
        return 1

    def kernel(table, prog, nprims, nslices, timeout_ns):
        y = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        p, nparts = cuda.blockIdx.x, cuda.gridDim.x
        lane, nlanes = cuda.threadIdx.x, cuda.blockDim.x
        ok = cuda.shared.array(MAX_RANKS_PER_LAUNCH, np.int32)
        row = y * TABLE_COLS                 # indices, not pointer arithmetic: the simulator knows bases only
        src, out = np.uint64(addr_load(table, row + SRC)), np.uint64(addr_load(table, row + OUT))
        mine, left_f = np.uint64(addr_load(table, row + MY_FLAGS)), np.uint64(addr_load(table, row + LEFT_FLAGS))
        right_f, status = np.uint64(addr_load(table, row + RIGHT_FLAGS)), np.uint64(addr_load(table, row + STATUS))
        trace, calls = np.uint64(addr_load(table, row + TRACE)), np.uint64(addr_load(table, row + CALLS))
        left, right, nranks = addr_load(table, row + LEFT), addr_load(table, row + RIGHT), addr_load(table, row + NRANKS)
        aligned = addr_load(table, row + ALIGNED) != 0
        mc, ms, lc, ls = np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0)
        nbc, lo0, hi0, c0 = 0, 0, 0, 0
        if can_stage:                        # a staged call: copy the caller's src in before anyone reads ours
            stage_in = np.uint64(addr_load(table, row + STAGE_IN))
            if stage_in != 0:
                if nparts == 1:              # one block: one flat copy, every load in flight at once
                    copy(stage_in, src, 0, addr_load(table, row + STAGE_COUNT), lane, nlanes)
                else:                        # part p copies what it alone reads and flags: its part of each chunk
                    stage_copy(stage_in, src, prog, y, nprims, addr_load(table, row + FIRST_LO),
                               addr_load(table, row + FIRST_HI), nslices, p, nparts, lane, nlanes)
                rank_barrier()
        if codec_cols:                       # the codec's send buffers (ours, the left's) and primitive 0's chunk
            mc, ms = np.uint64(addr_load(table, row + SEND_CODES)), np.uint64(addr_load(table, row + SEND_SCALES))
            lc, ls = np.uint64(addr_load(table, row + LEFT_CODES)), np.uint64(addr_load(table, row + LEFT_SCALES))
            nbc, c0 = addr_load(table, row + CHUNK_BLOCKS), addr_load(table, row + FIRST_CHUNK)
            lo0, hi0 = addr_load(table, row + FIRST_LO), addr_load(table, row + FIRST_HI)
        K = np.uint64(nslices)
        deadline = np.uint64(0)
        base = np.uint64(0)
        call = np.uint64(0)
        if lane == 0:
            call = flag_load(calls, p)
            base = call * np.uint64(nprims * SLICE_STRIDE)
            ok[cuda.threadIdx.y] = 1
            t0 = global_ns()
            if timeout_ns != 0:
                deadline = t0 + np.uint64(timeout_ns)
            if trace != 0 and p == 0:
                trace_put(trace, 0, t0)
        # The walk, G slices at a time (G = K: each primitive over every slice first). Counters count finished
        # (primitive, slice) items in walk order: item (i, k) of group g (slices k0..k0+gk-1) is number
        # k0 * nprims + i * gk + (k - k0) + 1 of the call, on every rank alike, so ">= target" means "done".
        G = np.int64(group) if group != 0 else np.int64(nslices)     # G > K: one group (gk bounds it)
        for k0 in range(0, nslices, G):
            gk = min(G, nslices - k0)
            gbase = base + np.uint64(k0 * nprims)
            if not has_first:
                if lane == 0:
                    flag_put(mine, p, gbase + np.uint64(gk))       # primitive 0, send: my input is ready
            else:                                                  # primitive 0 encodes its slices
                for j in range(gk):
                    first(src, mc, ms, lo0, hi0, c0, nbc, k0 + j, nslices, p, nparts, lane, nlanes, aligned)
                    rank_barrier()
                    if lane == 0:
                        flag_put(mine, p, gbase + np.uint64(j + 1))
            for i in range(1, nprims):
                e = (y * (nprims - 1) + i - 1) * PROG_COLS
                lo, hi, bits = addr_load(prog, e), addr_load(prog, e + 1), addr_load(prog, e + 2)
                reread, chunk = addr_load(prog, e + 3), addr_load(prog, e + 4)
                peer = np.uint64(addr_load(table, row + (LEFT_SRC if bits & FROM_SRC else LEFT_OUT)))
                for j in range(gk):
                    if lane == 0:
                        good = wait_geq(left_f, p, gbase + np.uint64((i - 1) * gk + j + 1), deadline, status, left, i)
                        if good and reread >= 0:    # right read this chunk at its primitive reread+1
                            good = wait_geq(right_f, p, gbase + np.uint64((reread + 1) * gk + j + 1),
                                            deadline, status, right, i)
                        ok[cuda.threadIdx.y] = good
                    rank_barrier()
                    if ok[cuda.threadIdx.y] == 0:
                        return
                    step(src, out, peer, mc, ms, lc, ls, nbc, lo, hi, chunk, bits, i == nprims - 1, k0 + j, nslices,
                         p, nparts, lane, nlanes, nranks, aligned)
                    rank_barrier()
                    if lane == 0:
                        flag_put(mine, p, gbase + np.uint64(i * gk + j + 1))
                if lane == 0 and trace != 0 and p == 0:
                    trace_put(trace, i, global_ns())          # the last group's times remain
        if can_stage:     # part p of every chunk is final in our stage: copy it out (the right may still read it)
            stage_out = np.uint64(addr_load(table, row + STAGE_OUT))
            if stage_out != 0:
                if nparts == 1:
                    copy(out, stage_out, 0, addr_load(table, row + STAGE_COUNT), lane, nlanes)
                else:
                    stage_copy(out, stage_out, prog, y, nprims, addr_load(table, row + FIRST_LO),
                               addr_load(table, row + FIRST_HI), nslices, p, nparts, lane, nlanes)
        if lane == 0:     # right reads our buffers until its last primitive; the caller may reuse them after us
            wait_geq(right_f, p, base + np.uint64(nprims) * K, deadline, status, right, nprims)
            flag_put(calls, p, call + np.uint64(1))
            if trace != 0 and p == 0:
                trace_put(trace, nprims, global_ns())

    return kernel
