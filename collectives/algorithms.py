"""All-reduce beyond the ring: recursive doubling, Rabenseifner, and the bidirectional ring."""
# Each is a host algorithm ``fn(flat_buffer, transport, op, cache)`` registered with
# ``api.register_allreduce``, so ``allreduce(x, algo=name)`` and the benchmark variants work unchanged.
#
#     algorithm            steps (N = 2^k)     bytes sent per rank     good for
#     ring                 2(N-1)              2(N-1)/N * S            large S (bandwidth-optimal)
#     recursive_doubling   log2 N              log2 N * S              small S (latency-optimal)
#     rabenseifner         2 log2 N            2(N-1)/N * S            both: halving RS + doubling AG
#     ring_bidir           2(N-1)              (N-1)/N * S per link    two directions of full-duplex links
#     direct               1                   (N-1) * S               tiny S (one round, all peers at once)
#
# N not a power of two: with p = 2^floor(log2 N) and rem = N - p, the first 2*rem ranks pair up
# (even r -> r+1), each even rank folds its whole buffer into its odd partner and sits out; the p
# remaining ranks run the power-of-two algorithm; the odd ranks then unfold the result back. That adds
# 2 steps of S bytes (MPICH's fix-up).
#
# Bitwise identity across ranks. IEEE a+b equals b+a, but NaN payloads and the sign of a zero from
# max/min can depend on operand order, and a non-canonical order changes the *tree* of additions
# (different rounding). So every combination here is written as op(lower-rank data, higher-rank data):
# in recursive doubling both partners then evaluate the same expression on the same bytes, and by
# induction every rank ends with the same tree ((x0+x1)+(x2+x3))+... In Rabenseifner and the rings each
# element is reduced by exactly one owner and then copied as bytes, so the copies agree trivially.
# ``avg`` accumulates a sum and divides once (at the owner, or once per rank on identical bytes).

import numpy as np
from mpi4py import MPI

from ringlab.kernels.optable import OP_TABLE
from ringlab.ops import reduce_into
from ringlab.ring import divide_inplace, scratch_buffer
from ringlab.schedule import chunk_bounds, reduce_scatter_owner, ring_allgather_schedule, ring_reduce_scatter_schedule
from ringlab.schedule import fold_layout, real_rank, virtual_rank
from ringlab.transport import MpiTransport, wait_all

__all__ = ["NonblockingTransport", "recursive_doubling_allreduce_inplace", "recursive_doubling_allreduce_into",
           "rabenseifner_allreduce_inplace", "ring_bidir_allreduce_inplace", "ring_bidir_allreduce_into",
           "direct_allreduce_inplace", "register_all", "HOST_ALGORITHMS"]

_UFUNC = {name: getattr(np, op.ufunc) for name, op in OP_TABLE.items()}   # kernels/optable.py


class NonblockingTransport(MpiTransport):
    """MpiTransport plus ``exchange``: post any number of sends and receives, then wait for all,
    so transfers to several peers (or both ring directions) progress together."""

    def exchange(self, sends=(), recvs=(), what=""):
        """``sends``/``recvs``: iterables of (buffer, peer, tag_offset); tags separate concurrent streams."""
        comm = self.comm
        recvs, sends = list(recvs), list(sends)
        reqs = [comm.Irecv([b.reshape(-1).view(np.uint8), MPI.BYTE], source=p, tag=self.tag + k) for b, p, k in recvs]
        reqs += [comm.Isend([b.reshape(-1).view(np.uint8), MPI.BYTE], dest=p, tag=self.tag + k) for b, p, k in sends]
        peers = [("send", p) for _, p, _ in recvs] + [("receive", p) for _, p, _ in sends]

        def describe():
            for req, (verb, peer) in zip(reqs, peers):
                if not req.Test():
                    return (f"rank {comm.rank}: peer rank {peer} did not {verb}"
                            f"{' during ' + what if what else ''}", peer)
            return f"rank {comm.rank}: transfers did not complete during {what}", None
        wait_all(reqs, self.timeout, describe)

    def send(self, buf, dest, what=""):
        self.exchange(sends=[(buf, dest, 0)], what=what)

    def recv(self, buf, source, what=""):
        self.exchange(recvs=[(buf, source, 0)], what=what)


def _nonblocking(transport):
    if isinstance(transport, NonblockingTransport):
        return transport
    return NonblockingTransport(transport.comm, timeout=transport.timeout, tag=transport.tag)


# Scratch beyond this many bytes is used in pieces of 1/PIECES of the buffer, so an out-of-place call peaks
# at input + output + 1/8 (issue: no algorithm above 2.2 input sizes); small buffers keep one message a step.
WHOLE_BYTES = 1 << 20
PIECES = 8


def _piece(count, itemsize, parts=1):
    """Elements per piece when ``parts`` pieces of that size are needed at once (see WHOLE_BYTES)."""
    if count * itemsize * parts <= WHOLE_BYTES:
        return max(count, 1)
    return max(1, -(-count // (PIECES * parts)))


def _pieces(count, piece):
    return [(p0, min(p0 + piece, count)) for p0 in range(0, count, piece)] or [(0, 0)]


def _scratch(cache, key, count, dtype):
    """Reusable receive buffer of ``count`` elements of ``dtype`` (ring.scratch_buffer, in elements)."""
    return scratch_buffer(cache, key, count * np.dtype(dtype).itemsize, dtype)


def _combine(mine, theirs, op, mine_is_lower):
    """mine = op(lower, higher): the operand order is fixed by rank, never by who computes."""
    f = _UFUNC[op]
    if mine_is_lower:
        f(mine, theirs, out=mine)
    else:
        f(theirs, mine, out=mine)


def _fold(buf, tr, op, rem, cache):
    """Ranks 0, 2, .., 2rem-2 hand their buffer to the next rank, which reduces it (lower rank first)."""
    r = tr.comm.rank
    if r >= 2 * rem:
        return
    piece = _piece(buf.size, buf.itemsize)
    for p0, p1 in _pieces(buf.size, piece):
        if r % 2 == 0:
            tr.send(buf[p0:p1], r + 1, what="fold to partner")
        else:
            recv = _scratch(cache, "fold", piece, buf.dtype)[: p1 - p0]
            tr.recv(recv, r - 1, what="fold from partner")
            _combine(buf[p0:p1], recv, op, mine_is_lower=False)


def _unfold(buf, tr, rem):
    """The odd ranks of the folded pairs send the finished result back to their even partner."""
    r = tr.comm.rank
    if r >= 2 * rem:
        return
    if r % 2 == 0:
        tr.recv(buf, r + 1, what="unfold from partner")
    else:
        tr.send(buf, r - 1, what="unfold to partner")


def recursive_doubling_allreduce_inplace(buf, transport, op="sum", cache=None):
    """log2(N) full-buffer exchanges with partner v XOR 2^k; every rank reduces the whole buffer.

        step 0: 0<->1  2<->3  4<->5  6<->7      each pair holds x_{2i} + x_{2i+1}
        step 1: 0<->2  1<->3  4<->6  5<->7      each quad holds (x0+x1) + (x2+x3)
        step 2: 0<->4  1<->5  2<->6  3<->7      everyone holds ((x0+x1)+(x2+x3)) + ((x4+x5)+(x6+x7))
    """
    cache = cache if cache is not None else {}
    tr = _nonblocking(transport)
    n, r = tr.comm.size, tr.comm.rank
    p, rem = fold_layout(n)
    _fold(buf, tr, op, rem, cache)
    v = virtual_rank(r, rem)
    if v >= 0:
        piece = _piece(buf.size, buf.itemsize)
        recv_all = _scratch(cache, "recv", piece, buf.dtype)
        mask = 1
        while mask < p:
            pv = v ^ mask
            for p0, p1 in _pieces(buf.size, piece):
                recv = recv_all[: p1 - p0]
                tr.sendrecv(buf[p0:p1], real_rank(pv, rem), recv, real_rank(pv, rem),
                            what=f"recursive doubling, distance {mask}")
                _combine(buf[p0:p1], recv, op, mine_is_lower=v < pv)
            mask <<= 1
        if op == "avg":
            divide_inplace(buf, n)   # identical bytes on every rank, divided once each: still identical
    _unfold(buf, tr, rem)


def recursive_doubling_allreduce_into(x, out, transport, op="sum", cache=None):
    """The same out of place: the first exchange sends ``x`` itself and combines into ``out`` (no copy of ``x``);
    N not a power of two folds in place, so it copies first."""
    cache = cache if cache is not None else {}
    tr = _nonblocking(transport)
    n = tr.comm.size
    p, rem = fold_layout(n)
    if rem or n == 1:
        out[...] = x
        recursive_doubling_allreduce_inplace(out, tr, op, cache)
        return
    v = tr.comm.rank
    piece = _piece(x.size, x.itemsize)
    recv_all = _scratch(cache, "recv", piece, x.dtype)
    f = _UFUNC[op]
    for p0, p1 in _pieces(x.size, piece):
        recv = recv_all[: p1 - p0]
        tr.sendrecv(x[p0:p1], v ^ 1, recv, v ^ 1, what="recursive doubling, distance 1")
        lower, higher = (x[p0:p1], recv) if v < v ^ 1 else (recv, x[p0:p1])
        f(lower, higher, out=out[p0:p1])
    if p > 2:
        _doubling_from(out, tr, op, cache, v, p, 2)
    elif op == "avg":
        divide_inplace(out, n)


def _doubling_from(buf, tr, op, cache, v, p, mask):
    """Recursive doubling steps ``mask``, 2*mask, .. < p on a power-of-two communicator (no fold), in place."""
    piece = _piece(buf.size, buf.itemsize)
    recv_all = _scratch(cache, "recv", piece, buf.dtype)
    while mask < p:
        pv = v ^ mask
        for p0, p1 in _pieces(buf.size, piece):
            recv = recv_all[: p1 - p0]
            tr.sendrecv(buf[p0:p1], pv, recv, pv, what=f"recursive doubling, distance {mask}")
            _combine(buf[p0:p1], recv, op, mine_is_lower=v < pv)
        mask <<= 1
    if op == "avg":
        divide_inplace(buf, tr.comm.size)


recursive_doubling_allreduce_inplace.into = recursive_doubling_allreduce_into


def _span(bounds, c0, c1):
    """Element range covered by chunks c0..c1-1."""
    return bounds[c0][0], bounds[c1 - 1][1]


def rabenseifner_allreduce_inplace(buf, transport, op="sum", cache=None):
    """Reduce-scatter by recursive halving, then all-gather by recursive doubling (Rabenseifner).

    The buffer is cut into p chunks (``chunk_bounds``). Halving: at distance d = p/2, p/4, .., 1 a
    rank keeps the half of its current chunk range on its side of bit d, sends the other half to
    v XOR d and reduces the half it receives; after log2 p steps virtual rank v owns chunk v fully
    reduced. Doubling replays the distances backwards, swapping owned ranges until all hold all.
    """
    cache = cache if cache is not None else {}
    tr = _nonblocking(transport)
    n, r = tr.comm.size, tr.comm.rank
    p, rem = fold_layout(n)
    _fold(buf, tr, op, rem, cache)
    v = virtual_rank(r, rem)
    if v >= 0:
        bounds = chunk_bounds(buf.size, p)
        piece = _piece(bounds[0][1] * (p // 2 if p > 1 else 1), buf.itemsize)
        recv_all = _scratch(cache, "recv", piece, buf.dtype)
        c0, c1, d = 0, p, p // 2
        while d >= 1:
            pv, peer = v ^ d, real_rank(v ^ d, rem)
            mid = c0 + (c1 - c0) // 2
            keep, give = ((c0, mid), (mid, c1)) if v & d == 0 else ((mid, c1), (c0, mid))
            k0, k1 = _span(bounds, *keep)
            g0, g1 = _span(bounds, *give)
            # piece i of my half to give is piece i of the partner's half to keep, and vice versa
            for p0, p1 in _pieces(max(g1 - g0, k1 - k0), piece):
                keep_part = buf[k0 + p0:min(k0 + p1, k1)]
                recv = recv_all[: keep_part.size]
                tr.sendrecv(buf[g0 + p0:min(g0 + p1, g1)], peer, recv, peer, what=f"recursive halving, distance {d}")
                _combine(keep_part, recv, op, mine_is_lower=v < pv)
            c0, c1 = keep
            d //= 2
        if op == "avg":
            lo, hi = bounds[v]
            divide_inplace(buf[lo:hi], n)   # the owner divides once; everyone else receives its bytes
        d = 1
        while d < p:
            pv, peer = v ^ d, real_rank(v ^ d, rem)
            m0, m1 = _span(bounds, (v // d) * d, (v // d) * d + d)
            t0, t1 = _span(bounds, (pv // d) * d, (pv // d) * d + d)
            tr.sendrecv(buf[m0:m1], peer, buf[t0:t1], peer, what=f"recursive doubling all-gather, distance {d}")
            d *= 2
    _unfold(buf, tr, rem)


def ring_bidir_allreduce_inplace(buf, transport, op="sum", cache=None):
    """Two rings at once: the first half of the buffer goes around r -> r+1, the second half
    around r -> r-1 (the same schedule on the reversed rank order), each step posting both
    directions' sends and receives together so full-duplex links carry traffic both ways.
    """
    _ring_bidir(buf, buf, transport, op, cache if cache is not None else {})


def ring_bidir_allreduce_into(x, out, transport, op="sum", cache=None):
    """The same out of place: each chunk is received into its place in ``out`` and reduced there as
    local op received (the in-place operand order: the same bytes), so no scratch and no copy of ``x``."""
    if transport.comm.size == 1:
        out[...] = x
    _ring_bidir(x, out, transport, op, None)


def _ring_bidir(x, buf, transport, op, cache):
    """ring_bidir from ``x`` into ``buf`` (the same array in place, which receives into ``cache``'s scratch)."""
    tr = _nonblocking(transport)
    n, r = tr.comm.size, tr.comm.rank
    inplace = x is buf
    half = chunk_bounds(buf.size, 2)[0][1]
    rings = [(x[:half], buf[:half], r, lambda v: v), (x[half:], buf[half:], n - 1 - r, lambda v: n - 1 - v)]
    # per ring: (input, data, virtual rank, virtual -> real rank), chunk bounds, scratch (in place only)
    bounds = [chunk_bounds(data.size, n) for _, data, _, _ in rings]
    if inplace:
        scratch = [_scratch(cache, f"recv{i}", b[0][1], buf.dtype) for i, b in enumerate(bounds)]
    rs = [ring_reduce_scatter_schedule(v, n) for _, _, v, _ in rings]
    for s in range(n - 1):
        sends, recvs, reduces = [], [], []
        for i, ((src, data, _, real), b) in enumerate(zip(rings, bounds)):
            st = rs[i][s]
            s0, s1 = b[st.send_chunk]
            r0, r1 = b[st.recv_chunk]
            sends.append(((data if inplace or s else src)[s0:s1], real(st.send_to), i))
            recv = scratch[i][: r1 - r0] if inplace else data[r0:r1]
            recvs.append((recv, real(st.recv_from), i))
            reduces.append((data[r0:r1], recv, src[r0:r1]))
        tr.exchange(sends, recvs, what=f"bidirectional ring reduce-scatter step {s}")
        for dst, received, local in reduces:
            if inplace:
                reduce_into(dst, received, op)
            else:
                _UFUNC[op](local, received, out=received)
    if op == "avg":
        for (_, data, v, _), b in zip(rings, bounds):
            lo, hi = b[reduce_scatter_owner(v, n)]
            divide_inplace(data[lo:hi], n)
    ag = [ring_allgather_schedule(v, n) for _, _, v, _ in rings]
    for s in range(n - 1):
        sends, recvs = [], []
        for i, ((_, data, _, real), b) in enumerate(zip(rings, bounds)):
            st = ag[i][s]
            s0, s1 = b[st.send_chunk]
            r0, r1 = b[st.recv_chunk]
            sends.append((data[s0:s1], real(st.send_to), i))
            recvs.append((data[r0:r1], real(st.recv_from), i))
        tr.exchange(sends, recvs, what=f"bidirectional ring all-gather step {s}")


ring_bidir_allreduce_inplace.into = ring_bidir_allreduce_into


def direct_allreduce_inplace(buf, transport, op="sum", cache=None):
    """One round: every rank sends its whole buffer to every other rank and reduces all N copies
    locally, in rank order 0, 1, .., N-1. One latency (all messages in flight at once) for (N-1)*S
    bytes per rank: the latency-optimal choice for tiny messages, the CPU analogue of a GPU one-shot.
    The fixed order makes every rank evaluate the identical expression, hence identical bytes.
    """
    cache = cache if cache is not None else {}
    tr = _nonblocking(transport)
    n, r = tr.comm.size, tr.comm.rank
    if n == 1:
        if op == "avg":
            divide_inplace(buf, 1)
        return
    piece = _piece(buf.size, buf.itemsize, parts=n)    # n slots of a piece: at most 1/PIECES of the buffer
    slots_all = _scratch(cache, "slots", n * piece, buf.dtype).reshape(n, piece)
    others = [k for k in range(n) if k != r]
    for p0, p1 in _pieces(buf.size, piece):     # one round per piece: N pieces of scratch, not N buffers
        part, slots = buf[p0:p1], slots_all[:, : p1 - p0]
        tr.exchange(sends=[(part, k, 0) for k in others], recvs=[(slots[k], k, 0) for k in others],
                    what="direct all-to-all exchange")
        slots[r] = part
        part[...] = slots[0]
        for k in range(1, n):
            reduce_into(part, slots[k], op)
    if op == "avg":
        divide_inplace(buf, n)


HOST_ALGORITHMS = {
    "direct": direct_allreduce_inplace,
    "recursive_doubling": recursive_doubling_allreduce_inplace,
    "rabenseifner": rabenseifner_allreduce_inplace,
    "ring_bidir": ring_bidir_allreduce_inplace,
}


def register_all():
    """Register this module's algorithms with the public API (done on ``import ringlab``)."""
    from ringlab.api import register_allreduce
    for name, fn in HOST_ALGORITHMS.items():
        register_allreduce(name, fn)
