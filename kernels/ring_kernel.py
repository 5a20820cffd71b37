"""The persistent ring kernel: one launch walks a rank's primitive program on the GPU (docs/device_ring.md).

Pull form: recv_* wait (acquire) on the left's counter, read its chunk over CUDA IPC, publish (release) on
their own; block p owns part p of every chunk, counters count slices. The codec is a compile-time parameter.
"""
from dataclasses import dataclass

import numpy as np

from ringlab.kernels.device import SIMULATED, cuda
from ringlab.kernels.optable import DEVICE_DTYPES, OPS, combine_of
from ringlab.kernels.flags import flag_load, flag_store, global_ns, pointer_access, quad_access

__all__ = ["Codec", "IDENTITY", "ring_kernel", "TABLE_COLS", "PROG_COLS", "SLICE_STRIDE", "MAX_SLICES",
           "STATUS_OK", "STATUS_TIMEOUT", "MAX_PARTS", "REDUCE", "FROM_SRC", "FINAL", "KERNEL_DTYPES", "KERNEL_OPS"]

# Per rank in the launch, one row of addresses (uint64): buffers, counters, status, trace, and ranks.
(SRC, OUT, LEFT_SRC, LEFT_OUT, MY_FLAGS, LEFT_FLAGS, RIGHT_FLAGS, STATUS, TRACE, CALLS, LEFT, RIGHT, NRANKS,
 ALIGNED) = range(14)
TABLE_COLS = 14                     # ALIGNED: 1 when src, out and the left's buffers are 16-byte aligned
# Per rank, per primitive 1..2N-2 (send, primitive 0, has no data): lo, hi, flag bits, reread (-1: none).
PROG_COLS = 4
REDUCE, FROM_SRC, FINAL = 1, 2, 4
MAX_SLICES = 8
SLICE_STRIDE = 64                   # counter values per primitive per call: base = call * (2N-1) * SLICE_STRIDE
MAX_PARTS = 64                      # blocks per rank; flags[p] is part p's counter, calls[p] its call count
STATUS_OK, STATUS_TIMEOUT = 0, 1    # status words: code, peer rank waited on, primitive index
KERNEL_DTYPES, KERNEL_OPS = DEVICE_DTYPES, OPS     # from the one op/dtype table
MAX_RANKS_PER_LAUNCH = 64


@dataclass(frozen=True)
class Codec:
    """How a chunk travels between ranks, fixed when the kernel is compiled.

    ``identity``: the right neighbour reads the elements themselves from this rank's output. An FP8 codec
    (issue 17) adds a per-rank send buffer of codes and block scales: ``send`` and ``recv_reduce_send``
    encode into it, ``recv_*`` decode from the left's, the owner's ``recv_reduce_copy_send`` keeps fp32.
    """
    name: str


IDENTITY = Codec("identity")
_kernels = {}
_SIGNATURE = "void(uint64, uint64, int64, int64, uint64)"


def _combine(op, dtype):
    """Device function ``(local, peer, nranks, final) -> value`` in ``dtype``'s rules (host ring's results)."""
    dt = np.dtype(dtype)
    half = dt == np.float16                                 # compile-time constants below
    wide = np.float32 if half else dt.type                  # f16 computed in f32, rounded once (as NumPy)
    narrow = dt.type
    divide = op == "avg"

    how = combine_of(op)
    if how == "sum":
        def combine(a, b, n, final):
            s = wide(a) + wide(b)
            if divide and final:
                if half:
                    s = wide(narrow(s))                     # the sum is rounded to f16, then divided
                s = s / wide(n)
            return narrow(s)
    elif how == "prod":
        def combine(a, b, n, final):
            return narrow(wide(a) * wide(b))
    elif how == "max":
        def combine(a, b, n, final):              # NaN propagates like numpy.maximum
            x, y = wide(a), wide(b)
            return narrow(y if (y > x or y != y) else x)
    else:
        def combine(a, b, n, final):
            x, y = wide(a), wide(b)
            return narrow(y if (y < x or y != y) else x)
    return cuda.jit(device=True)(combine)


if SIMULATED:
    def _rank_barrier():
        pass                                       # one thread per rank: nothing to wait for
    rank_barrier = cuda.jit(device=True)(_rank_barrier)
else:
    @cuda.jit(device=True)
    def rank_barrier():
        cuda.syncthreads()                         # a rank's part = one CUDA block


def ring_kernel(dtype, op, codec=IDENTITY):
    """The compiled persistent kernel for (dtype, op, codec). Parameters: table and program addresses,
    nprims (2N-1), slices K, timeout_ns (0: no limit). No per-call parameter: a block counts its calls on
    the device (calls[p]), so a CUDA graph replays it correctly."""
    key = (np.dtype(dtype).name, op, codec)
    if key not in _kernels:
        _kernels[key] = cuda.jit(_SIGNATURE)(ring_kernel_source(dtype, op, codec))
    return _kernels[key]


def ring_kernel_source(dtype, op, codec=IDENTITY):
    """The kernel as a Python function, before compilation (for ``cuda.compile_ptx`` checks)."""
    key = (np.dtype(dtype).name, op, codec)
    if codec != IDENTITY:
        raise NotImplementedError(f"codec {codec.name!r}: only the identity codec exists so far")
    if key[0] not in KERNEL_DTYPES or op not in KERNEL_OPS:
        raise TypeError(f"the device ring has no kernel for {key[0]} {op}")
    load, store = pointer_access(dtype)
    load4, store4 = quad_access(dtype)
    addr_load, _ = pointer_access(np.int64)
    combine = _combine(op, dtype)

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

    @cuda.jit(device=True)
    def reduce_range(src, peer, out, a, b, lane, nlanes, nranks, final):
        """out[j] = src[j] (op) peer[j] for j in [a, b): four independent loads per input in flight."""
        j = a + lane
        while j + 3 * nlanes < b:
            s0, s1, s2, s3 = load(src, j), load(src, j + nlanes), load(src, j + 2 * nlanes), load(src, j + 3 * nlanes)
            q0, q1, q2, q3 = load(peer, j), load(peer, j + nlanes), load(peer, j + 2 * nlanes), load(peer, j + 3 * nlanes)
            store(out, j, combine(s0, q0, nranks, final))
            store(out, j + nlanes, combine(s1, q1, nranks, final))
            store(out, j + 2 * nlanes, combine(s2, q2, nranks, final))
            store(out, j + 3 * nlanes, combine(s3, q3, nranks, final))
            j += 4 * nlanes
        while j < b:
            store(out, j, combine(load(src, j), load(peer, j), nranks, final))
            j += nlanes

    @cuda.jit(device=True)
    def reduce_quads(src, peer, out, a, b, lane, nlanes, nranks, final):
        """The same over quads (16-byte vector accesses) for [a4, b4), scalar head and tail."""
        a4 = min((a + 3) // 4 * 4, b)
        b4 = max(b // 4 * 4, a4)
        j = a + lane
        while j < a4:
            store(out, j, combine(load(src, j), load(peer, j), nranks, final))
            j += nlanes
        j = b4 + lane
        while j < b:
            store(out, j, combine(load(src, j), load(peer, j), nranks, final))
            j += nlanes
        q, qe = a4 // 4 + lane, b4 // 4
        while q + nlanes < qe:
            s0, s1, s2, s3 = load4(src, q)
            t0, t1, t2, t3 = load4(src, q + nlanes)
            p0, p1, p2, p3 = load4(peer, q)
            u0, u1, u2, u3 = load4(peer, q + nlanes)
            store4(out, q, combine(s0, p0, nranks, final), combine(s1, p1, nranks, final),
                   combine(s2, p2, nranks, final), combine(s3, p3, nranks, final))
            store4(out, q + nlanes, combine(t0, u0, nranks, final), combine(t1, u1, nranks, final),
                   combine(t2, u2, nranks, final), combine(t3, u3, nranks, final))
            q += 2 * nlanes
        if q < qe:
            s0, s1, s2, s3 = load4(src, q)
            p0, p1, p2, p3 = load4(peer, q)
            store4(out, q, combine(s0, p0, nranks, final), combine(s1, p1, nranks, final),
                   combine(s2, p2, nranks, final), combine(s3, p3, nranks, final))

    @cuda.jit(device=True)
    def copy_quads(peer, out, a, b, lane, nlanes):
        a4 = min((a + 3) // 4 * 4, b)
        b4 = max(b // 4 * 4, a4)
        j = a + lane
        while j < a4:
            store(out, j, load(peer, j))
            j += nlanes
        j = b4 + lane
        while j < b:
            store(out, j, load(peer, j))
            j += nlanes
        q, qe = a4 // 4 + lane, b4 // 4
        while q + nlanes < qe:
            p0, p1, p2, p3 = load4(peer, q)
            u0, u1, u2, u3 = load4(peer, q + nlanes)
            store4(out, q, p0, p1, p2, p3)
            store4(out, q + nlanes, u0, u1, u2, u3)
            q += 2 * nlanes
        if q < qe:
            p0, p1, p2, p3 = load4(peer, q)
            store4(out, q, p0, p1, p2, p3)

    @cuda.jit(device=True)
    def copy_range(peer, out, a, b, lane, nlanes):
        j = a + lane
        while j + 3 * nlanes < b:
            q0, q1, q2, q3 = load(peer, j), load(peer, j + nlanes), load(peer, j + 2 * nlanes), load(peer, j + 3 * nlanes)
            store(out, j, q0)
            store(out, j + nlanes, q1)
            store(out, j + 2 * nlanes, q2)
            store(out, j + 3 * nlanes, q3)
            j += 4 * nlanes
        while j < b:
            store(out, j, load(peer, j))
            j += nlanes

    @cuda.jit(device=True)
    def part(lo, hi, k, nslices, p, nparts):
        """[a, b) of block p in slice k of [lo, hi): slices and parts split as evenly as chunk_bounds does."""
        n = hi - lo
        q, r = n // nslices, n % nslices
        s0 = lo + k * q + min(k, r)
        m = q + (1 if k < r else 0)
        q2, r2 = m // nparts, m % nparts
        a = s0 + p * q2 + min(p, r2)
        return a, a + q2 + (1 if p < r2 else 0)

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
                flag_store(trace, 0, t0)
            flag_store(mine, p, base + K)                      # primitive 0, send: my input is ready
        for i in range(1, nprims):
            e = (y * (nprims - 1) + i - 1) * PROG_COLS
            lo, hi, bits, reread = addr_load(prog, e), addr_load(prog, e + 1), addr_load(prog, e + 2), addr_load(prog, e + 3)
            peer = np.uint64(addr_load(table, row + (LEFT_SRC if bits & FROM_SRC else LEFT_OUT)))
            for k in range(nslices):
                if lane == 0:
                    good = wait_geq(left_f, p, base + np.uint64(i - 1) * K + np.uint64(k + 1),
                                    deadline, status, left, i)
                    if good and reread >= 0:    # right read this chunk at its primitive reread+1
                        good = wait_geq(right_f, p, base + np.uint64(reread + 1) * K + np.uint64(k + 1),
                                        deadline, status, right, i)
                    ok[cuda.threadIdx.y] = good
                rank_barrier()
                if ok[cuda.threadIdx.y] == 0:
                    return
                a, b = part(lo, hi, k, nslices, p, nparts)
                final = (bits & FINAL) != 0
                if bits & REDUCE:
                    if aligned:
                        reduce_quads(src, peer, out, a, b, lane, nlanes, nranks, final)
                    else:
                        reduce_range(src, peer, out, a, b, lane, nlanes, nranks, final)
                elif aligned:
                    copy_quads(peer, out, a, b, lane, nlanes)
                else:
                    copy_range(peer, out, a, b, lane, nlanes)
                rank_barrier()
                if lane == 0:
                    flag_store(mine, p, base + np.uint64(i) * K + np.uint64(k + 1))
            if lane == 0 and trace != 0 and p == 0:
                flag_store(trace, i, global_ns())
        if lane == 0:     # right reads our src and out until its last primitive; the caller may reuse them after us
            wait_geq(right_f, p, base + np.uint64(nprims) * K, deadline, status, right, nprims)
            flag_store(calls, p, call + np.uint64(1))
            if trace != 0 and p == 0:
                flag_store(trace, nprims, global_ns())

    return kernel
