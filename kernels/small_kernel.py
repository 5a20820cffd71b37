"""One-shot and two-shot all-reduce as persistent kernels: one launch per rank, flag barriers (docs/device_small.md).

Each rank copies its input into its half of a scratch buffer every peer mapped once; block p of every rank owns
part p of every chunk, so barriers are per part. Results are the host ring's bits: chunk c folds from rank c.
"""
import numpy as np

from ringlab.kernels.device import cuda
from ringlab.kernels.flags import FLAG_SCOPES, flag_access, flag_load, flag_store, global_ns, pointer_access, quad_access
from ringlab.kernels.optable import DEVICE_DTYPES, OPS
from ringlab.kernels.ring_kernel import _combine, rank_barrier

__all__ = ["small_kernel", "small_kernel_source", "launch_parts", "table_row", "ALGOS", "ROW", "MAX_RANKS",
           "MAX_PARTS", "PHASES", "STATUS_OK", "STATUS_TIMEOUT", "PHASE_INPUT", "PHASE_REDUCED", "KERNEL_DTYPES",
           "KERNEL_OPS", "TRACE_WORDS"]

ALGOS = ("oneshot", "twoshot")
# One row of int64 words per rank in the launch (the GPU launch has one rank; the simulator has N):
# SRC/OUT are used only when the kernel's src/out parameters are 0 (the simulator's N ranks in one launch).
(SRC, OUT, STATUS, CALLS, TRACE, RANK, NRANKS, CAP) = range(8)
SCRATCH = 8                          # SCRATCH + q: our address of rank q's scratch (q = rank: our own)
MAX_RANKS = 32
FLAGS = SCRATCH + MAX_RANKS          # FLAGS + q: our address of rank q's per-part counters
ROW = FLAGS + MAX_RANKS
MAX_PARTS = 64                       # counters: words 0..63 (peers read them); calls: a separate word array
PHASES = 2                           # counter values per call: base = call * PHASES; +1 input copied, +2 reduced
STATUS_OK, STATUS_TIMEOUT = 0, 1     # status words: code, peer waited on, phase, call
PHASE_INPUT, PHASE_REDUCED = 1, 2
TRACE_WORDS = 4                      # block 0 of the rank: start, inputs ready, chunks reduced, exit (globaltimer)
KERNEL_DTYPES, KERNEL_OPS = DEVICE_DTYPES, OPS
MAX_RANKS_PER_LAUNCH = 64
_SIGNATURE = "void(uint64, uint64, int64, uint64, uint64)"
_kernels = {}


def table_row(scratch, flags, status, calls, trace, rank, nranks, cap_bytes, src=0, out=0):
    """One rank's row (list of ints): ``scratch``/``flags`` list every rank's address as this rank maps it."""
    if not 1 <= nranks <= MAX_RANKS:
        raise ValueError(f"one-shot/two-shot kernels take 1..{MAX_RANKS} ranks, got {nranks}")
    row = [0] * ROW
    row[SRC], row[OUT], row[STATUS], row[CALLS], row[TRACE] = src, out, status, calls, trace
    row[RANK], row[NRANKS], row[CAP] = rank, nranks, cap_bytes
    row[SCRATCH: SCRATCH + nranks] = scratch
    row[FLAGS: FLAGS + nranks] = flags
    return row


def launch_parts(algo, nranks, count, itemsize, max_parts):
    """Blocks per rank: one for small messages (each block is a flag hop's worth of waiting), more for large
    ones (one-shot reads N times the buffer, two-shot twice its chunk), at most ``max_parts``."""
    chunk = -(-count // max(nranks, 1)) * itemsize
    work = count * itemsize * nranks if algo == "oneshot" else 2 * chunk * nranks
    return int(max(1, min(max_parts, MAX_PARTS, work // (256 << 10))))


def small_kernel(dtype, op, algo, scope="sys"):
    """The compiled kernel for (dtype, op, algo, flag scope). Parameters: src, out, count, table address,
    timeout_ns (0: no limit). No per-call parameter: each block counts its calls on the device (graph replay
    works). ``scope`` "gpu" when every rank runs on this GPU (cheaper fences), else "sys"."""
    key = (np.dtype(dtype).name, op, algo, scope)
    if key not in _kernels:
        _kernels[key] = cuda.jit(_SIGNATURE)(small_kernel_source(dtype, op, algo, scope))
    return _kernels[key]


def small_kernel_source(dtype, op, algo, scope="sys"):
    """The kernel as a Python function, before compilation."""
    name = np.dtype(dtype).name
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {', '.join(ALGOS)}, got {algo!r}")
    if scope not in FLAG_SCOPES:
        raise ValueError(f"flag scope must be one of {FLAG_SCOPES}, got {scope!r}")
    if name not in KERNEL_DTYPES or op not in KERNEL_OPS:
        raise TypeError(f"the one-shot/two-shot kernels have no kernel for {name} {op}")
    twoshot = algo == "twoshot"
    load, store = pointer_access(dtype)
    load4, store4 = quad_access(dtype)
    addr_load, _ = pointer_access(np.int64)
    combine = _combine(op, dtype)
    itemsize = np.dtype(dtype).itemsize
    peer_load, peer_store = flag_access(scope)     # the counters; status and trace (host memory) stay sys
    # calls[p] is written by this rank's kernel and read by its next one, which stream order already orders: plain
    # accesses, no fence. Trace words: plain stores too, read by the host after a sync (no fence to time).
    own_load, own_store = pointer_access(np.uint64)
    stamp = own_store

    @cuda.jit(device=True)
    def wait_peers(flags, n, rank, p, target, deadline, status, phase, call, lane, nlanes):
        """Lanes spin (acquire) on the peers' part-p counters, one peer per lane; 1 = all arrived."""
        good = 1
        q = lane
        while q < n:
            if q != rank:
                f = np.uint64(flags[q])
                while peer_load(f, p) < target:
                    if deadline != 0 and global_ns() > deadline:
                        if flag_load(status, 0) == STATUS_OK:
                            flag_store(status, 3, call)
                            flag_store(status, 2, np.uint64(phase))
                            flag_store(status, 1, np.uint64(q))
                            flag_store(status, 0, np.uint64(STATUS_TIMEOUT))
                        good = 0
                        break
            q += nlanes
        return good

    @cuda.jit(device=True)
    def bounds(q, r, c, p, nparts):
        """[a, b) of part p of chunk c, with q, r = divmod(count, n) (computed once per call: 64-bit divisions
        are slow): chunks as schedule.chunk_bounds, parts split each chunk the same way."""
        lo = c * q + min(c, r)
        m = q + (1 if c < r else 0)
        if nparts == 1:
            return lo, lo + m
        q2, r2 = m // nparts, m % nparts
        a = lo + p * q2 + min(p, r2)
        return a, a + q2 + (1 if p < r2 else 0)

    # fold / fold4: the host ring's order (chunk c from rank c onwards), combined one peer at a time, but the
    # peers' loads issued four (then two) at a time: one dependent L2 round trip per batch, not per peer.
    @cuda.jit(device=True)
    def peer_at(scr, n, c, k):
        q = c + k
        if q >= n:
            q -= n
        return np.uint64(scr[q])

    @cuda.jit(device=True)
    def fold(scr, n, c, e):
        """Element e of every rank's scratch, folded as the host ring folds chunk c: from rank c onwards."""
        acc = load(np.uint64(scr[c]), e)
        k = 1
        while k + 3 < n:
            v0, v1 = load(peer_at(scr, n, c, k), e), load(peer_at(scr, n, c, k + 1), e)
            v2, v3 = load(peer_at(scr, n, c, k + 2), e), load(peer_at(scr, n, c, k + 3), e)
            acc = combine(v0, acc, n, k == n - 1)
            acc = combine(v1, acc, n, k + 1 == n - 1)
            acc = combine(v2, acc, n, k + 2 == n - 1)
            acc = combine(v3, acc, n, k + 3 == n - 1)
            k += 4
        if k + 1 < n:
            v0, v1 = load(peer_at(scr, n, c, k), e), load(peer_at(scr, n, c, k + 1), e)
            acc = combine(v0, acc, n, k == n - 1)
            acc = combine(v1, acc, n, k + 1 == n - 1)
            k += 2
        if k < n:
            acc = combine(load(peer_at(scr, n, c, k), e), acc, n, True)
        return acc

    @cuda.jit(device=True)
    def combine4(a0, a1, a2, a3, v0, v1, v2, v3, n, last):
        return combine(v0, a0, n, last), combine(v1, a1, n, last), combine(v2, a2, n, last), combine(v3, a3, n, last)

    @cuda.jit(device=True)
    def fold4(scr, n, c, qe):
        a0, a1, a2, a3 = load4(np.uint64(scr[c]), qe)
        k = 1
        while k + 3 < n:
            v0, v1, v2, v3 = load4(peer_at(scr, n, c, k), qe)
            w0, w1, w2, w3 = load4(peer_at(scr, n, c, k + 1), qe)
            x0, x1, x2, x3 = load4(peer_at(scr, n, c, k + 2), qe)
            y0, y1, y2, y3 = load4(peer_at(scr, n, c, k + 3), qe)
            a0, a1, a2, a3 = combine4(a0, a1, a2, a3, v0, v1, v2, v3, n, k == n - 1)
            a0, a1, a2, a3 = combine4(a0, a1, a2, a3, w0, w1, w2, w3, n, k + 1 == n - 1)
            a0, a1, a2, a3 = combine4(a0, a1, a2, a3, x0, x1, x2, x3, n, k + 2 == n - 1)
            a0, a1, a2, a3 = combine4(a0, a1, a2, a3, y0, y1, y2, y3, n, k + 3 == n - 1)
            k += 4
        if k + 1 < n:
            v0, v1, v2, v3 = load4(peer_at(scr, n, c, k), qe)
            w0, w1, w2, w3 = load4(peer_at(scr, n, c, k + 1), qe)
            a0, a1, a2, a3 = combine4(a0, a1, a2, a3, v0, v1, v2, v3, n, k == n - 1)
            a0, a1, a2, a3 = combine4(a0, a1, a2, a3, w0, w1, w2, w3, n, k + 1 == n - 1)
            k += 2
        if k < n:
            v0, v1, v2, v3 = load4(peer_at(scr, n, c, k), qe)
            a0, a1, a2, a3 = combine4(a0, a1, a2, a3, v0, v1, v2, v3, n, True)
        return a0, a1, a2, a3

    @cuda.jit(device=True)
    def reduce_part(scr, n, c, off, out, mine, a, b, lane, nlanes, aligned):
        """out[j] = fold of element off + j for j in [a, b); two-shot also keeps it in our scratch (mine)."""
        a4, b4 = a, a
        if aligned:
            a4 = min((a + 3) // 4 * 4, b)
            b4 = max(b // 4 * 4, a4)
        j = a + lane
        while j < a4:
            v = fold(scr, n, c, off + j)
            store(out, j, v)
            if twoshot:
                store(mine, off + j, v)
            j += nlanes
        j = b4 + lane
        while j < b:
            v = fold(scr, n, c, off + j)
            store(out, j, v)
            if twoshot:
                store(mine, off + j, v)
            j += nlanes
        qi, qend, qoff = a4 // 4 + lane, b4 // 4, off // 4
        while qi < qend:
            v0, v1, v2, v3 = fold4(scr, n, c, qoff + qi)
            store4(out, qi, v0, v1, v2, v3)
            if twoshot:
                store4(mine, qoff + qi, v0, v1, v2, v3)
            qi += nlanes

    @cuda.jit(device=True)
    def copy_part(src, soff, dst, doff, a, b, lane, nlanes, aligned):
        """dst[doff + j] = src[soff + j] for j in [a, b) (soff, doff multiples of 4 when aligned)."""
        a4, b4 = a, a
        if aligned:
            a4 = min((a + 3) // 4 * 4, b)
            b4 = max(b // 4 * 4, a4)
        j = a + lane
        while j < a4:
            store(dst, doff + j, load(src, soff + j))
            j += nlanes
        j = b4 + lane
        while j < b:
            store(dst, doff + j, load(src, soff + j))
            j += nlanes
        qi, qend = a4 // 4 + lane, b4 // 4
        while qi < qend:
            v0, v1, v2, v3 = load4(src, soff // 4 + qi)
            store4(dst, doff // 4 + qi, v0, v1, v2, v3)
            qi += nlanes

    def kernel(src_p, out_p, count, table, timeout_ns):
        y = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        p, nparts = cuda.blockIdx.x, cuda.gridDim.x
        lane, nlanes = cuda.threadIdx.x, cuda.blockDim.x
        ok = cuda.shared.array(MAX_RANKS_PER_LAUNCH, np.int32)
        row = y * ROW                    # indices, not pointer arithmetic: the simulator knows bases only
        src, out = src_p, out_p
        if src == np.uint64(0):
            src, out = np.uint64(addr_load(table, row + SRC)), np.uint64(addr_load(table, row + OUT))
        status, calls = np.uint64(addr_load(table, row + STATUS)), np.uint64(addr_load(table, row + CALLS))
        trace = np.uint64(addr_load(table, row + TRACE))
        rank, n, cap = addr_load(table, row + RANK), addr_load(table, row + NRANKS), addr_load(table, row + CAP)
        scr = cuda.local.array(MAX_RANKS, np.int64)
        flg = cuda.local.array(MAX_RANKS, np.int64)
        for q in range(n):
            scr[q] = addr_load(table, row + SCRATCH + q)
            flg[q] = addr_load(table, row + FLAGS + q)
        mine, my_flags = np.uint64(scr[rank]), np.uint64(flg[rank])
        call = own_load(calls, p)
        qn = count // n
        rn = count - qn * n
        base = call * np.uint64(PHASES)
        off = np.int64(call & np.uint64(1)) * (cap // itemsize)      # this call's half of every scratch
        aligned = ((src | out) & np.uint64(15)) == np.uint64(0)
        t0 = global_ns()
        deadline = np.uint64(0)
        if timeout_ns != 0:
            deadline = t0 + timeout_ns
        if lane == 0:
            ok[cuda.threadIdx.y] = 1
            if trace != 0 and p == 0:
                stamp(trace, 0, t0)
        # Lane groups (whole warps) take chunks g, g + groups, ...: the chunks' round trips overlap instead of
        # following one another (a lane finishes one chunk's loads and stores before it starts the next).
        warps = max(nlanes // 32, 1)
        groups = min(n, warps)
        gsize = nlanes if nlanes < 32 else warps // groups * 32
        g, gl = lane // gsize, lane % gsize
        # phase 1: our part p of every chunk into our scratch half, published; wait for every peer's
        if nparts == 1:                  # one part: the chunks tile the buffer, one copy by every lane
            copy_part(src, 0, mine, off, 0, count, lane, nlanes, aligned)
        else:
            for c in range(n):
                a, b = bounds(qn, rn, c, p, nparts)
                copy_part(src, 0, mine, off, a, b, lane, nlanes, aligned)
        rank_barrier()
        if lane == 0:
            peer_store(my_flags, p, base + np.uint64(PHASE_INPUT))
        if wait_peers(flg, n, rank, p, base + np.uint64(PHASE_INPUT), deadline, status, PHASE_INPUT, call,
                      lane, nlanes) == 0:
            ok[cuda.threadIdx.y] = 0
        rank_barrier()
        if ok[cuda.threadIdx.y] == 0:
            return
        if lane == 0 and trace != 0 and p == 0:
            stamp(trace, 1, global_ns())
        if not twoshot:
            c = g
            while g < groups and c < n:  # one-shot: every chunk, each folded in the host ring's order
                a, b = bounds(qn, rn, c, p, nparts)
                reduce_part(scr, n, c, off, out, mine, a, b, gl, gsize, aligned)
                c += groups
        else:
            a, b = bounds(qn, rn, rank, p, nparts)     # reduce-scatter by reads: our chunk from every input
            reduce_part(scr, n, rank, off, out, mine, a, b, lane, nlanes, aligned)
            rank_barrier()
            if lane == 0:
                peer_store(my_flags, p, base + np.uint64(PHASE_REDUCED))
            if wait_peers(flg, n, rank, p, base + np.uint64(PHASE_REDUCED), deadline, status, PHASE_REDUCED,
                          call, lane, nlanes) == 0:
                ok[cuda.threadIdx.y] = 0
            rank_barrier()
            if ok[cuda.threadIdx.y] == 0:
                return
            if lane == 0 and trace != 0 and p == 0:
                stamp(trace, 2, global_ns())
            c = g
            while g < groups and c < n:  # all-gather by reads of the owners' reduced chunks
                if c != rank:
                    a, b = bounds(qn, rn, c, p, nparts)
                    copy_part(np.uint64(scr[c]), off, out, 0, a, b, gl, gsize, aligned)
                c += groups
        # No exit barrier: the next call writes the other half; the one after waits (phase 1) for every peer
        # to have started the call in between, which on its stream means it finished reading this half.
        if lane == 0:
            own_store(calls, p, call + np.uint64(1))
            if trace != 0 and p == 0:
                stamp(trace, 3, global_ns())

    return kernel
