"""The persistent fp8-direct kernel: quantize once, owners accumulate in fp32, FP8 all-gather (collectives/fp8.py).

One launch per rank, three phases separated by flag barriers with every peer; the codec is fp8_ring_codec.py's.
"""
# Rank r's send buffer holds Q(x[chunk c]) at chunk c's positions for every c != r (owner c pulls it) and,
# after phase 2, Q(sum of chunk r) at chunk r's (everyone pulls it). Part p of every chunk is block p's:
#   phase 1: encode x[c], c != r                                      -> flags[p] = base + 1
#   phase 2: wait all >= base + 1; acc = x[r] + D(from r-1) + ... + D(from r-N+1) in fp32 (the host's order),
#            avg: / N; encode acc into chunk r, out[r] = D(it)         -> base + 2
#   phase 3: wait all >= base + 2; out[c] = D(owner c's chunk c)      -> base + 3
#   exit:    wait all >= base + 3 (nobody reads our buffer any more), calls[p] += 1
import numpy as np
from numba import float32

from ringlab.kernels.device import cuda
from ringlab.kernels.flags import flag_access, flag_store, global_ns, pointer_access
from ringlab.kernels.formats import check_block, fp8_format
from ringlab.kernels.fp8_ring_codec import DECODE, ENCODE, FWD_TILES, GROUP, TILES, block_part, fp8_block_ops
from ringlab.kernels.fp8_ring_quads import fp8_quad_ops
from ringlab.kernels.fp8_ring_tiles import fp8_tile_ops
from ringlab.kernels.intrinsics import shfl_xor_fmax
from ringlab.kernels.ring_layout import STATUS_TIMEOUT

__all__ = ["direct_kernel", "DIRECT_COLS", "PEER_COLS", "PHASES"]

# Per rank in the launch: one row. Per peer (indexed by rank): our mapping of its codes, scales, flags.
(D_SRC, D_OUT, D_CODES, D_SCALES, D_FLAGS, D_STATUS, D_TRACE, D_CALLS, D_RANK, D_CHUNK_BLOCKS, D_PEERS,
 D_ALIGNED) = range(12)
DIRECT_COLS = 12                # D_ALIGNED: 1 when src and out are 16-byte aligned (the vector path)
PEER_COLS = 3
PHASES = 4                     # counter values per call: base = call * PHASES
_SIGNATURE = "void(uint64, int64, int64, int64, uint64)"
_kernels = {}


def direct_kernel(dtype, op, fmt, block, scope="sys", max_registers=None, tiles=TILES, fwd_tiles=FWD_TILES,
                  warp_steps=0, prefetch=0):
    """The compiled fp8-direct kernel. Parameters: table address, nranks, count, unused (0), timeout_ns.
    ``scope``: the flags' ("gpu" when every rank runs on this GPU); ``max_registers`` caps registers per thread;
    ``tiles`` / ``fwd_tiles``: blocks per lane group and round on the vector path (fp8_ring_tiles.py; 0: untiled);
    ``prefetch``: rounds ahead its encode and decode phases ask L2 for."""
    key = (np.dtype(dtype).name, op, fp8_format(fmt).name, check_block(block), scope, max_registers, tiles, fwd_tiles,
           warp_steps, prefetch)
    if key not in _kernels:
        options = {} if max_registers is None else {"max_registers": int(max_registers)}
        _kernels[key] = cuda.jit(_SIGNATURE, **options)(direct_kernel_source(dtype, op, fmt, block, scope, tiles,
                                                                            fwd_tiles, warp_steps, prefetch))
    return _kernels[key]


def direct_kernel_source(dtype, op, fmt, block, scope="sys", tiles=TILES, fwd_tiles=FWD_TILES, warp_steps=0,
                         prefetch=0):
    """The kernel as a Python function, before compilation (``warp_steps`` > 0: the encode and decode phases on
    fp8_ring_warps.py's warp tiles; the owner's fold keeps the lane-group tiles)."""
    from ringlab.kernels.ring_kernel import rank_barrier
    ops = fp8_block_ops(dtype, op, fmt, block)
    move, load_values, add_decoded, encode_store = ops.move, ops.load_values, ops.add_decoded, ops.encode_store
    per, divide = ops.per, ops.divide
    quad = fp8_quad_ops(dtype, op, fmt, block)
    move4, load_values4, add_decoded4, encode_store4 = quad.move4, quad.load_values4, quad.add_decoded4, quad.encode_store4
    lanes, quads = quad.lanes, quad.quads
    per_warp = GROUP // lanes
    legacy = tiles == 0 and not warp_steps
    tile = fp8_tile_ops(dtype, op, fmt, block, max(int(tiles), 1), fwd_tiles, prefetch=prefetch)
    run, load_tile, load_words, add_words = tile.run, tile.load_tile, tile.load_words, tile.add_words
    if warp_steps:
        from ringlab.kernels.fp8_ring_warps import fp8_warp_ops
        run = fp8_warp_ops(dtype, op, fmt, block, warp_steps).run
    lane_max, store_tile, tgroup, tper_warp = tile.lane_max, tile.store_tile, tile.group, tile.per_warp
    one = np.float32(1.0)
    addr_load, _ = pointer_access(np.int64)
    flag_load, flag_put = flag_access(scope)           # the counters; status (host memory) stays sys

    @cuda.jit(device=True)
    def bounds(c, count, nranks):
        q, r = count // nranks, count % nranks
        lo = c * q + min(c, r)
        return lo, lo + q + (1 if c < r else 0)

    @cuda.jit(device=True)
    def wait_all(peers, me, nranks, p, target, deadline, status, phase):
        """Lane 0: every peer's flags[p] >= target (acquire), nearest left first; 0 on timeout (recorded)."""
        for k in range(1, nranks):
            q = (me - k) % nranks
            f = np.uint64(addr_load(peers, q * PEER_COLS + 2))
            while flag_load(f, p) < target:
                if deadline != 0 and global_ns() > deadline:
                    flag_store(status, 2, np.uint64(phase))
                    flag_store(status, 1, np.uint64(q))
                    flag_store(status, 0, np.uint64(STATUS_TIMEOUT))
                    return 0
        return 1

    @cuda.jit(device=True)
    def chunk(mode, src, out, lc, ls, mc, ms, c, count, nranks, nbc, p, nparts, lane, nlanes, aligned):
        """ENCODE our chunk c into our buffer, or DECODE owner c's (lc, ls) into out: part p's blocks."""
        lo, hi = bounds(c, count, nranks)
        ta, tb = block_part(lo, hi, block, 0, 1, p, nparts)
        groups = max(nlanes // GROUP, 1)
        if aligned and lo % 4 == 0 and not legacy:
            run(mode, src, out, lc, ls, mc, ms, lo, hi, ta, tb, c * nbc, lane, nlanes, nranks, False)
            return
        if aligned and lo % 4 == 0:
            wl = lane % GROUP
            gw = ta + (lane // GROUP) * per_warp
            while gw < tb:
                g = gw + wl // lanes
                e0 = lo + g * block
                move4(mode, src, out, lc, ls, mc, ms, e0, min(e0 + block, hi), c * nbc + g, wl % lanes, nranks,
                      False, g < tb)
                gw += groups * per_warp
            return
        g = ta + lane // GROUP
        while g < tb:
            e0 = lo + g * block
            move(mode, src, out, lc, ls, mc, ms, e0, min(e0 + block, hi), c * nbc + g, lane % GROUP, nranks, False)
            g += groups

    @cuda.jit(device=True)
    def peer_codes(peers, q):
        return np.uint64(addr_load(peers, q * PEER_COLS))

    @cuda.jit(device=True)
    def peer_scales(peers, q):
        return np.uint64(addr_load(peers, q * PEER_COLS + 1))

    @cuda.jit(device=True)
    def owner_tiles(src, out, mc, ms, peers, me, nranks, nbc, lo, hi, ta, tb, lane, nlanes):
        """The owner's blocks on the vector path: four peers' code words in flight at once (added in order)."""
        va = cuda.local.array(quads, float32)
        vb = cuda.local.array(quads, float32)
        vc = cuda.local.array(quads, float32)
        vd = cuda.local.array(quads, float32)
        w0 = cuda.local.array(quads, np.uint32)
        w1 = cuda.local.array(quads, np.uint32)
        w2 = cuda.local.array(quads, np.uint32)
        w3 = cuda.local.array(quads, np.uint32)
        group = tgroup
        wl = lane % group
        t = wl % lanes
        stride = max(nlanes // group, 1) * tper_warp
        n32 = float32(nranks)
        gw = ta + (lane // group) * tper_warp
        while gw < tb:
            g = gw + wl // lanes
            slot = me * nbc + g
            full = g < tb and lo + (g + 1) * block <= hi
            load_tile(va, vb, vc, vd, w0, 0, src, src, src, lo, hi, g, tb, slot, t, full)
            for k in range(1, nranks, 4):
                q0, q1, q2, q3 = (me - k) % nranks, (me - k - 1) % nranks, (me - k - 2) % nranks, (me - k - 3) % nranks
                p0 = load_words(w0, peer_codes(peers, q0), peer_scales(peers, q0), lo, hi, g, tb, slot, t, full)
                p1, p2, p3 = one, one, one
                if k + 1 < nranks:
                    p1 = load_words(w1, peer_codes(peers, q1), peer_scales(peers, q1), lo, hi, g, tb, slot, t, full)
                if k + 2 < nranks:
                    p2 = load_words(w2, peer_codes(peers, q2), peer_scales(peers, q2), lo, hi, g, tb, slot, t, full)
                if k + 3 < nranks:
                    p3 = load_words(w3, peer_codes(peers, q3), peer_scales(peers, q3), lo, hi, g, tb, slot, t, full)
                add_words(va, vb, vc, vd, w0, p0)
                if k + 1 < nranks:
                    add_words(va, vb, vc, vd, w1, p1)
                if k + 2 < nranks:
                    add_words(va, vb, vc, vd, w2, p2)
                if k + 3 < nranks:
                    add_words(va, vb, vc, vd, w3, p3)
            if divide:
                for m in range(quads):
                    va[m], vb[m], vc[m], vd[m] = va[m] / n32, vb[m] / n32, vc[m] / n32, vd[m] / n32
            am = lane_max(va, vb, vc, vd)
            off = lanes >> 1
            while off > 0:
                am = shfl_xor_fmax(am, off)
                off = off >> 1
            store_tile(va, vb, vc, vd, mc, ms, out, lo, hi, g, tb, slot, t, am, full, True)
            gw += stride

    @cuda.jit(device=True)
    def owner(src, out, mc, ms, peers, me, count, nranks, nbc, p, nparts, lane, nlanes, aligned, v, va, vb, vc, vd):
        """Phase 2 for part p of our chunk: fp32 sum in the host's order, / N for avg, quantized once."""
        lo, hi = bounds(me, count, nranks)
        ta, tb = block_part(lo, hi, block, 0, 1, p, nparts)
        groups = max(nlanes // GROUP, 1)
        n32 = float32(nranks)
        if aligned and lo % 4 == 0 and not legacy:
            owner_tiles(src, out, mc, ms, peers, me, nranks, nbc, lo, hi, ta, tb, lane, nlanes)
            return
        if aligned and lo % 4 == 0:
            wl = lane % GROUP
            t = wl % lanes
            gw = ta + (lane // GROUP) * per_warp
            while gw < tb:
                g = gw + wl // lanes
                active = g < tb
                e0 = lo + g * block
                e1, slot, q0 = min(e0 + block, hi), me * nbc + g, e0 // 4 + t
                load_values4(va, vb, vc, vd, src, q0, e1, active)
                for k in range(1, nranks):
                    q = (me - k) % nranks
                    add_decoded4(va, vb, vc, vd, np.uint64(addr_load(peers, q * PEER_COLS)),
                                 np.uint64(addr_load(peers, q * PEER_COLS + 1)), q0, e1, slot, active)
                if divide:
                    for m in range(quads):
                        va[m], vb[m], vc[m], vd[m] = va[m] / n32, vb[m] / n32, vc[m] / n32, vd[m] / n32
                encode_store4(va, vb, vc, vd, mc, ms, out, q0, e1, slot, t, active, True)
                gw += groups * per_warp
            return
        t = lane % GROUP
        g = ta + lane // GROUP
        while g < tb:
            e0 = lo + g * block
            e1, slot = min(e0 + block, hi), me * nbc + g
            load_values(v, src, e0, e1, t)
            for k in range(1, nranks):
                q = (me - k) % nranks
                add_decoded(v, np.uint64(addr_load(peers, q * PEER_COLS)), np.uint64(addr_load(peers, q * PEER_COLS + 1)),
                            e0, e1, slot, t)
            if divide:
                for m in range(per):
                    v[m] = v[m] / n32
            encode_store(v, mc, ms, out, e0, e1, slot, t, True)
            g += groups

    def kernel(table, nranks, count, unused, timeout_ns):
        y = cuda.blockIdx.y * cuda.blockDim.y + cuda.threadIdx.y
        p, nparts = cuda.blockIdx.x, cuda.gridDim.x
        lane, nlanes = cuda.threadIdx.x, cuda.blockDim.x
        ok = cuda.shared.array(64, np.int32)
        v = cuda.local.array(per, float32)
        va = cuda.local.array(quads, float32)
        vb = cuda.local.array(quads, float32)
        vc = cuda.local.array(quads, float32)
        vd = cuda.local.array(quads, float32)
        row = y * DIRECT_COLS
        src, out = np.uint64(addr_load(table, row + D_SRC)), np.uint64(addr_load(table, row + D_OUT))
        mc, ms = np.uint64(addr_load(table, row + D_CODES)), np.uint64(addr_load(table, row + D_SCALES))
        mine, status = np.uint64(addr_load(table, row + D_FLAGS)), np.uint64(addr_load(table, row + D_STATUS))
        trace, calls = np.uint64(addr_load(table, row + D_TRACE)), np.uint64(addr_load(table, row + D_CALLS))
        me, nbc = addr_load(table, row + D_RANK), addr_load(table, row + D_CHUNK_BLOCKS)
        peers = np.uint64(addr_load(table, row + D_PEERS))
        aligned = addr_load(table, row + D_ALIGNED) != 0
        deadline, base, call = np.uint64(0), np.uint64(0), np.uint64(0)
        if lane == 0:
            call = flag_load(calls, p)
            base = call * np.uint64(PHASES)
            ok[cuda.threadIdx.y] = 1
            t0 = global_ns()
            if timeout_ns != 0:
                deadline = t0 + np.uint64(timeout_ns)
            if trace != 0 and p == 0:
                flag_store(trace, 0, t0)
        for k in range(1, nranks):                     # phase 1: quantize every chunk another rank owns
            chunk(ENCODE, src, src, mc, ms, mc, ms, (me + k) % nranks, count, nranks, nbc, p, nparts, lane, nlanes,
                  aligned)
        for phase in range(1, 3):
            rank_barrier()
            if lane == 0:
                flag_put(mine, p, base + np.uint64(phase))
                if trace != 0 and p == 0:
                    flag_store(trace, phase, global_ns())
                ok[cuda.threadIdx.y] = wait_all(peers, me, nranks, p, base + np.uint64(phase), deadline, status, phase)
            rank_barrier()
            if ok[cuda.threadIdx.y] == 0:
                return
            if phase == 1:                             # phase 2: the owner's fp32 sum, quantized once
                owner(src, out, mc, ms, peers, me, count, nranks, nbc, p, nparts, lane, nlanes, aligned, v, va, vb, vc,
                      vd)
            else:                                      # phase 3: every other owner's chunk, decoded
                for k in range(1, nranks):
                    c = (me - k) % nranks
                    chunk(DECODE, src, out, np.uint64(addr_load(peers, c * PEER_COLS)),
                          np.uint64(addr_load(peers, c * PEER_COLS + 1)), mc, ms, c, count, nranks, nbc, p, nparts,
                          lane, nlanes, aligned)
        rank_barrier()
        if lane == 0:
            flag_put(mine, p, base + np.uint64(3))
            wait_all(peers, me, nranks, p, base + np.uint64(3), deadline, status, 3)
            flag_put(calls, p, call + np.uint64(1))
            if trace != 0 and p == 0:
                flag_store(trace, 3, global_ns())

    return kernel
