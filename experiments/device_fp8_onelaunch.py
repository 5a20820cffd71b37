"""Every rank's kernel in ONE launch on one GPU (no MPI, no MPS): the fp32 device ring, the FP8 ring and fp8-direct
as a profiler sees them (Nsight Compute profiles one kernel; the per-rank kernels of 8 processes wait on each other).

    python experiments/device_fp8_onelaunch.py --json out.json                      # check, then time
    ncu --set full -k regex:^kernel --launch-skip 2 --launch-count 1 -o prof \\
        python experiments/device_fp8_onelaunch.py --paths fp8-ring --rounds 1      # profile one call

Rank r is grid row y = r (blockIdx.y): the same kernels, tables and flags as the per-rank executors
(docs/device_ring.md), gpu-scope flags; the grid must fit on the GPU at once (parts x N blocks, one per SM).
Every path is checked before it is timed: the fp32 ring exactly vs the float64 sum (integer-valued inputs), the
FP8 paths bit for bit vs the host FP8 executors run in-process (at --check-count elements).
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PATHS = ("fp32-ring", "fp8-ring", "fp8-direct")
TIMEOUT_NS = 5 * 10**9          # each rank's bounded spin: a stall ends in a status, not a hang


def _args(argv=None):
    from ringlab.bench.harness import size_list_arg
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, default=8)
    p.add_argument("--sizes", type=size_list_arg, default=size_list_arg("64M"), help="fp32 bytes per rank per call")
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--check-count", type=int, default=(1 << 20) + 3, help="elements of the bit-exact check")
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.paths = [s.strip() for s in a.paths.split(",") if s.strip()]
    bad = [s for s in a.paths if s not in PATHS]
    if bad or a.ranks < 2:
        p.error(f"--paths from {PATHS}, --ranks >= 2; got {bad or a.ranks}")
    return a


class OneLaunch:
    """N ranks' buffers on this GPU and one launch of ``path``'s kernel over all of them (its device_fp8 /
    device_ring default shape)."""

    def __init__(self, path, n, capacity):
        import cupy
        from ringlab.gpu.device_fp8 import LAUNCH
        from ringlab.gpu.device_plan import fp8_send_layout
        from ringlab.gpu.device_ring import MAX_REGISTERS, THREADS
        from ringlab.kernels.fp8_ring_codec import tiled_fp8_codec
        from ringlab.kernels.ring_kernel import MAX_PARTS
        self.path, self.n, self.cp = path, n, cupy
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        self.max_parts = min(MAX_PARTS, sms // n)
        if path == "fp32-ring":
            self.threads, self.regs = THREADS, MAX_REGISTERS
            self.codes_bytes = 0
        else:
            self.threads, self.regs, tiles, fwd = LAUNCH[path]
            self.codec = tiled_fp8_codec("e4m3", 128, tiles, fwd)
            self.codes_bytes, sb = fp8_send_layout(capacity, n, 128)
            self.send = [cupy.zeros(self.codes_bytes + sb, cupy.uint8) for _ in range(n)]
        self.words = [cupy.zeros(2 * MAX_PARTS, cupy.uint64) for _ in range(n)]       # counters | call counts
        self.status = [cupy.zeros(4, cupy.uint64) for _ in range(n)]
        self.calls_off = 8 * MAX_PARTS

    def kernel(self):
        from ringlab.kernels.fp8_direct_kernel import direct_kernel
        from ringlab.kernels.ring_kernel import IDENTITY, ring_kernel
        if self.path == "fp32-ring":
            return ring_kernel(np.float32, "sum", IDENTITY, scope="gpu", max_registers=self.regs)
        if self.path == "fp8-ring":
            return ring_kernel(np.float32, "sum", self.codec, scope="gpu", max_registers=self.regs)
        c = self.codec
        return direct_kernel(np.float32, "sum", c.fmt, c.block, "gpu", self.regs, c.tiles, c.fwd_tiles)

    def tables(self, srcs, outs):
        """(args of the launch, parts, device arrays the args point into): every rank's rows, as the per-rank
        executors build theirs."""
        from ringlab.gpu import device_fp8, device_ring
        from ringlab.gpu.device_plan import (address_row, chunk_blocks, direct_row, first_chunk, launch_shape,
                                             program_table)
        cp, n, count = self.cp, self.n, srcs[0].size
        P = [a.data.ptr for a in srcs], [a.data.ptr for a in outs]
        W, S = [w.data.ptr for w in self.words], [s.data.ptr for s in self.status]
        keep = []
        if self.path == "fp8-direct":
            nbc = chunk_blocks(count, n, 128)
            peers = cp.asarray(np.array([[s.data.ptr, s.data.ptr + self.codes_bytes, w]
                                         for s, w in zip(self.send, W)], np.int64))
            rows = [direct_row(P[0][r], P[1][r], self.send[r].data.ptr, self.send[r].data.ptr + self.codes_bytes,
                               W[r], S[r], 0, W[r] + self.calls_off, r, nbc, peers.data.ptr) for r in range(n)]
            keep.append(peers)
        elif self.path == "fp8-ring":
            nbc, C = chunk_blocks(count, n, 128), [s.data.ptr for s in self.send]
            rows = [address_row(P[0][r], P[1][r], 0, 0, W[r], W[r - 1], W[(r + 1) % n], S[r], 0, W[r] + self.calls_off,
                                r, n, send_codes=C[r], send_scales=C[r] + self.codes_bytes, left_codes=C[r - 1],
                                left_scales=C[r - 1] + self.codes_bytes, blocks_per_chunk=nbc,
                                first=first_chunk(count, n, r)) for r in range(n)]
        else:
            rows = [address_row(P[0][r], P[1][r], P[0][r - 1], P[1][r - 1], W[r], W[r - 1], W[(r + 1) % n], S[r], 0,
                                W[r] + self.calls_off, r, n) for r in range(n)]
        table = cp.asarray(np.array(rows, np.int64))
        keep.append(table)
        slice_bytes = device_ring.SLICE_BYTES if self.path == "fp32-ring" else device_fp8.SLICE_BYTES
        parts, slices = launch_shape(n, count, 4, self.max_parts, slice_bytes)
        if self.path == "fp8-direct":
            args = (np.uint64(table.data.ptr), np.int64(n), np.int64(count), np.int64(0), np.uint64(TIMEOUT_NS))
        else:
            prog = cp.asarray(program_table(n, count, range(n)))
            keep.append(prog)
            args = (np.uint64(table.data.ptr), np.uint64(prog.data.ptr), np.int64(2 * n - 1), np.int64(slices),
                    np.uint64(TIMEOUT_NS))
        return args, parts, keep

    def prepare(self, srcs, outs):
        """A launcher of ``calls`` back-to-back calls on (srcs, outs) (tables built, kernel compiled)."""
        from ringlab.kernels.device import launch
        args, parts, keep = self.tables(srcs, outs)
        kern = self.kernel()

        def calls_(calls=1):
            for _ in range(calls):
                launch(kern, (parts, self.n), (self.threads, 1), *args)
        calls_.parts, calls_.keep = parts, keep          # the tables live as long as the launcher
        return calls_

    def verify(self):
        """Wait for the GPU; a rank whose bounded spin ended (a stall) raises."""
        self.cp.cuda.runtime.deviceSynchronize()
        bad = [r for r, s in enumerate(self.status) if int(s[0].get()) != 0]
        if bad:
            raise RuntimeError(f"{self.path}: ranks {bad} stalled (status {[s.get().tolist() for s in self.status]})")

    def run(self, srcs, outs, calls=1):
        go = self.prepare(srcs, outs)
        go(calls)
        self.verify()
        return go.parts


def _inputs(n, count, seed, integer=False):
    rng = np.random.default_rng(seed)
    if integer:
        return [rng.integers(-8, 9, count).astype(np.float32) for _ in range(n)]
    return [(rng.standard_normal(count) * 2).astype(np.float32) for _ in range(n)]


def check(ex, count):
    """None when every rank's output is right (see the module docstring), else what is wrong."""
    from experiments.device_fp8_bench import _in_process
    cp = ex.cp
    host = _inputs(ex.n, count, 7, integer=ex.path == "fp32-ring")
    srcs = [cp.asarray(x) for x in host]
    outs = [cp.full(count, np.nan, cp.float32) for _ in host]
    ex.run(srcs, outs)
    got = [o.get() for o in outs]
    if ex.path == "fp32-ring":
        want = [np.sum(np.array(host, np.float64), axis=0).astype(np.float32)] * ex.n
    else:
        want = _in_process(host, ex.path, "e4m3", 128)
    wrong = [r for r in range(ex.n) if not np.array_equal(got[r].view(np.uint32), want[r].view(np.uint32))]
    return None if not wrong else f"{ex.path}: ranks {wrong} differ from the reference at {count} elements"


def time_calls(ex, count, calls, rounds):
    """(median ms per call, parts): ``calls`` launches back to back between two events, median of ``rounds``."""
    cp = ex.cp
    srcs = [cp.asarray(x) for x in _inputs(ex.n, count, 3)]
    outs = [cp.empty_like(s) for s in srcs]
    go = ex.prepare(srcs, outs)
    go(1)                                                       # compiled, warm
    ex.verify()
    times = []
    for _ in range(rounds):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        go(calls)
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b) / calls)
    ex.verify()
    return float(np.median(times)), go.parts


def main(argv=None):
    a = _args(argv)
    from ringlab.bench.harness import require_gpu
    require_gpu("device_fp8_onelaunch.py")
    rows = []
    for path in a.paths:
        for size in a.sizes:
            count = size // 4
            ex = OneLaunch(path, a.ranks, max(count, a.check_count))
            wrong = check(ex, a.check_count)
            if wrong:
                print("#wrong:", wrong, flush=True)
                return 1
            ms, parts = time_calls(ex, count, a.calls, a.rounds)
            algbw = size / (ms * 1e-3) / 1e9
            rows.append({"path": path, "bytes": size, "ranks": a.ranks, "parts": parts, "threads": ex.threads,
                         "max_registers": ex.regs, "ms": ms, "algbw_GBps": algbw, "check": "ok"})
            print(f"{path:10s} {size >> 20:5d} MB  N={a.ranks} parts={parts} {ex.threads}x{ex.regs}  {ms:8.3f} ms "
                  f"{algbw:7.1f} GB/s  checked", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"what": "all ranks in one launch on one GPU", "calls": a.calls, "rounds": a.rounds,
                       "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
