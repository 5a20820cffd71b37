"""No leak across repeated collectives (CPU): RSS, Python heap blocks and open fds stay flat.

    leak_rss.py [--iters 350] [--warmup 50] [--rss-limit-kib 4096] [--blocks-limit 500]

Each iteration runs every registered all-reduce algorithm, a reduce-scatter and an all-gather on
small buffers (odd count): 350 iterations are over 1,000 collectives. Every 10th iteration also
makes one rank pass a bad dtype, so the validation's error path (exceptions, tracebacks, the text
exchange) is repeated too. After the warm-up, growth must stay below the limits: a leak of one
Python object per call would add > 1,000 heap blocks, one 4 KiB page per call > 4 MiB of RSS.
"""
import argparse
import gc
import os
import sys

import numpy as np
from mpi4py import MPI

import ringlab
from ringlab.api import ALLREDUCE_ALGORITHMS
from ringlab.bench.harness import pattern, reference, rss_kib

comm = MPI.COMM_WORLD
rank, n = comm.rank, comm.size


def snapshot():
    gc.collect()
    return {"rss_kib": rss_kib(), "heap_blocks": sys.getallocatedblocks(), "fds": len(os.listdir("/proc/self/fd"))}


def one_iteration(i, x, count):
    for algo in sorted(ALLREDUCE_ALGORITHMS):
        ringlab.allreduce(x, op="sum", algo=algo)
    ringlab.reduce_scatter(x, op="max")
    ringlab.allgather(x[:7])
    if i % 10 == 0:
        bad = x.astype(np.complex64) if rank == n - 1 else x
        try:
            ringlab.allreduce(bad)
        except ringlab.InvalidCollectiveCall:
            pass
        else:
            raise AssertionError("mismatched dtype was not rejected")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=350)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--count", type=int, default=1021)
    p.add_argument("--rss-limit-kib", type=int, default=4096)
    p.add_argument("--blocks-limit", type=int, default=500)
    args = p.parse_args()
    x = pattern(args.count, "float32", rank)
    for i in range(args.warmup):
        one_iteration(i, x, args.count)
    comm.Barrier()
    before = snapshot()
    for i in range(args.iters):
        one_iteration(i, x, args.count)
    comm.Barrier()
    after = snapshot()
    y = ringlab.allreduce(x)
    assert np.array_equal(y.astype(np.float64), reference(args.count, n)), "wrong result after the loop"
    growth = {k: after[k] - before[k] for k in before}
    rows = comm.gather(growth, root=0)
    if rank == 0:
        calls = args.iters * (len(ALLREDUCE_ALGORITHMS) + 2) + args.iters // 10
        for r, g in enumerate(rows):
            print(f"rank {r}: {calls} collectives: rss {g['rss_kib']:+d} KiB, heap blocks {g['heap_blocks']:+d}, "
                  f"fds {g['fds']:+d}", flush=True)
        worst = {k: max(g[k] for g in rows) for k in rows[0]}
        ok = (worst["rss_kib"] <= args.rss_limit_kib and worst["heap_blocks"] <= args.blocks_limit
              and worst["fds"] <= 0)
        print(f"leak check: {'ok' if ok else 'LEAK'} (worst rss {worst['rss_kib']:+d} KiB <= {args.rss_limit_kib}, "
              f"heap blocks {worst['heap_blocks']:+d} <= {args.blocks_limit}, fds {worst['fds']:+d} <= 0)", flush=True)
        status = 0 if ok else 1
    else:
        status = None
    return comm.bcast(status, root=0)


if __name__ == "__main__":
    sys.exit(main())
