"""Leak check: repeat each collective many times and show what grew (host and, with --device, GPU).

    mpirun -n 4 python experiments/leak_check.py                  # CPU: RSS, heap blocks, fds
    mpirun -n 4 python experiments/leak_check.py --device         # + CuPy pool, device memory, pinned, IPC

For every registered all-reduce algorithm (and device executor), reduce_scatter and allgather: a
warm-up, a snapshot, ``--iters`` calls, a snapshot; each row is the worst growth over the ranks.
Device columns: CuPy pool bytes in use, device memory in use (cudaMemGetInfo, shared by all
ranks on the GPU, read between barriers), pinned host blocks the CuPy pool holds free, and open
CUDA IPC handles when a collectives module reports them (``open_ipc_handles()``; else n/a).
Exit status 1 when any growth passes its limit.
"""
import argparse
import gc
import importlib
import json
import os
import pkgutil
import sys

import numpy as np
from mpi4py import MPI

import ringlab
from ringlab import api
from ringlab.bench.harness import pattern, reference, rss_kib


def ipc_handle_count():
    """Sum of ``open_ipc_handles()`` over loaded ringlab modules that offer it (each function once), else None."""
    found = {id(f): f for name, m in list(sys.modules.items()) if name.startswith("ringlab.")
             for f in [getattr(m, "open_ipc_handles", None)] if callable(f)}
    return sum(f() for f in found.values()) if found else None


def snapshot(comm, cupy):
    if cupy is not None:
        cupy.cuda.Device().synchronize()
    gc.collect()
    comm.Barrier()  # device memory is shared by the ranks: read it when nobody is mid-call
    snap = {"rss_kib": rss_kib(), "heap_blocks": sys.getallocatedblocks(), "fds": len(os.listdir("/proc/self/fd"))}
    if cupy is not None:
        free, total = cupy.cuda.runtime.memGetInfo()
        snap.update(pool_used=cupy.get_default_memory_pool().used_bytes(), device_used=total - free,
                    pinned_free_blocks=cupy.get_default_pinned_memory_pool().n_free_blocks(),
                    ipc_handles=ipc_handle_count())
    comm.Barrier()
    return snap


def workloads(comm, xp, count, device):
    """(name, call) for every collective and algorithm to repeat."""
    x = pattern(count, "float32", comm.rank, xp=xp)
    algos = sorted(set(api.ALLREDUCE_ALGORITHMS) | (set(api.DEVICE_ALGORITHMS) if device else set()))
    jobs = [(f"allreduce[{a}]", (lambda a=a: api.allreduce(x, algo=a, comm=comm))) for a in algos]
    if device:  # every device transport of the ring: IPC rings (shared and per rank) and staging
        jobs += [(f"allreduce[ring via {t}]", (lambda t=t: api.allreduce(x, transport=t, comm=comm)))
                 for t in ("ipc-shared", "ipc", "ipc-host", "staged")]
        jobs += [(f"allreduce_fp8[ring via {t}]", (lambda t=t: ringlab.allreduce_fp8(x, transport=t, comm=comm)))
                 for t in ("ipc", "staged")]
    jobs.append(("reduce_scatter", lambda: api.reduce_scatter(x, comm=comm)))
    jobs.append(("allgather", lambda: api.allgather(x[:13], comm=comm)))
    return x, jobs


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", action="store_true", help="CuPy buffers on the GPU (rank r -> GPU r %% ngpus)")
    p.add_argument("--iters", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--count", type=int, default=4099)
    p.add_argument("--rss-limit-kib", type=int, default=8192)
    p.add_argument("--blocks-limit", type=int, default=None, help="default: iters / 2")
    p.add_argument("--device-limit-mib", type=float, default=16.0)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    for info in pkgutil.walk_packages(ringlab.__path__, "ringlab."):  # let every module register its algorithms
        try:
            importlib.import_module(info.name)
        except Exception:
            pass
    cupy = None
    if args.device:
        from ringlab.arrays import use_local_gpu
        use_local_gpu(comm)
        import cupy
    xp = cupy if cupy is not None else np
    blocks_limit = args.blocks_limit if args.blocks_limit is not None else args.iters // 2
    x, jobs = workloads(comm, xp, args.count, cupy is not None)
    rows, ok_all = [], True
    for name, call in jobs:
        for _ in range(args.warmup):
            call()
        before = snapshot(comm, cupy)
        for _ in range(args.iters):
            call()
        after = snapshot(comm, cupy)
        growth = {k: (None if before[k] is None else after[k] - before[k]) for k in before}
        everyone = comm.allgather(growth)
        worst = {k: (None if any(g[k] is None for g in everyone) else max(g[k] for g in everyone)) for k in growth}
        limits = {"rss_kib": args.rss_limit_kib, "heap_blocks": blocks_limit, "fds": 0, "pool_used": 0,
                  "device_used": args.device_limit_mib * 2 ** 20, "pinned_free_blocks": None, "ipc_handles": 0}
        ok = all(worst[k] is None or limits[k] is None or worst[k] <= limits[k] for k in worst)
        ok_all &= ok
        rows.append(dict(what=name, calls=args.iters, ok=ok, **worst))
    y = api.allreduce(x, comm=comm)
    host_y = y.get() if cupy is not None else y
    correct = bool(np.array_equal(np.asarray(host_y, dtype=np.float64), reference(args.count, comm.size)))
    if comm.rank == 0:
        print(f"leak check: backend={'cupy' if cupy is not None else 'numpy'} ranks={comm.size} iters={args.iters} "
              f"count={args.count} (worst growth over ranks after {args.warmup} warm-up calls)")
        cols = [c for c in ("rss_kib", "heap_blocks", "fds", "pool_used", "device_used", "pinned_free_blocks",
                            "ipc_handles") if c in rows[0]]
        print(f"{'what':<22}" + "".join(f"{c:>20}" for c in cols) + "  verdict")
        for r in rows:
            print(f"{r['what']:<22}" + "".join(f"{'n/a' if r[c] is None else r[c]:>20}" for c in cols)
                  + ("  ok" if r["ok"] else "  LEAK"))
        print(f"result after the loops: {'correct' if correct else 'WRONG'}")
        print(f"leak check: {'ok' if ok_all and correct else 'LEAK'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows, "ranks": comm.size, "device": cupy is not None, "correct": correct}, f,
                          indent=1, default=str)
    return 0 if comm.bcast(ok_all and correct, root=0) else 1


if __name__ == "__main__":
    sys.exit(main())
