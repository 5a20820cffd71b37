"""GPU data path: IPC ring (with and without pipelining), host staging, MPI and NCCL, vs the HBM floor.

    mpirun -n 8 python experiments/gpu_datapath.py --sizes 64M,256M --json out.json

Ranks sharing one GPU move about 5(N-1)*S bytes of HBM traffic for a ring all-reduce (read peer +
read local + write local in reduce-scatter, read peer + write local in all-gather), so the floor is
5(N-1)*S / (device copy bandwidth measured in this run, counting bytes read + written).
"""
import argparse
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.arrays import use_local_gpu  # noqa: E402
from ringlab.bench.harness import format_table, measure, run_metadata, write_json  # noqa: E402
from ringlab.gpu.device import select_transport  # noqa: E402
from ringlab.bench.variants import allreduce_variant, mpi_native_variant, nccl_variant  # noqa: E402
from ringlab.bench.harness import require_gpu, size_arg, size_list_arg  # noqa: E402


def copy_bandwidth(nbytes=1 << 30, reps=20):
    """Device-to-device copy bandwidth in B/s, counting bytes read plus bytes written (median)."""
    import cupy
    a = cupy.random.random(nbytes // 8)
    b = cupy.empty_like(a)
    times = []
    for i in range(reps + 3):
        s, e = cupy.cuda.Event(), cupy.cuda.Event()
        s.record()
        b[...] = a
        e.record()
        e.synchronize()
        if i >= 3:
            times.append(cupy.cuda.get_elapsed_time(s, e) * 1e-3)
    assert bool((b == a).all()), "device copy check failed"
    return 2 * a.nbytes / float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size_list_arg, default="64M,256M")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--slices", default="1,4,16", help="IPC pipeline slice counts to compare")
    p.add_argument("--staged-max", type=size_arg, default="64M", help="skip host staging above this size (it is slow)")
    p.add_argument("--variants", default="ipc-shared,ipc,ipc-host,staged,mpi-staged,nccl",
                   help="comma list of: ipc-shared, ipc (one row per --slices), ipc-host, staged, mpi-staged, nccl, "
                        "oneshot, twoshot")
    p.add_argument("--baseline", default="staged", help="variant the ratio column divides by")
    p.add_argument("--json")
    args = p.parse_args()
    require_gpu("gpu_datapath.py")
    comm = MPI.COMM_WORLD
    n = comm.size
    gpu = use_local_gpu(comm)
    import cupy
    say = print if comm.rank == 0 else (lambda *a, **k: None)
    name, _, why = select_transport(comm)
    say(f"N = {n} ranks, rank 0 on GPU {gpu} ({cupy.cuda.runtime.getDeviceProperties(gpu)['name'].decode()}), "
        f"{cupy.cuda.runtime.getDeviceCount()} GPU(s) visible; auto transport: {name} ({why})")
    bw = copy_bandwidth() if comm.rank == 0 else None
    bw = comm.bcast(bw, root=0)
    say(f"device copy bandwidth (read + write): {bw / 1e9:.0f} GB/s")
    itemsize = np.dtype(args.dtype).itemsize
    sizes, staged_max = args.sizes, args.staged_max
    wanted = args.variants.split(",")
    rows = []
    for size in sizes:
        variants = []
        for name in wanted:
            if name in ("staged", "mpi-staged") and size > staged_max:
                continue
            if name == "nccl":
                variants.append(nccl_variant(comm))
            elif name == "mpi-staged":
                variants.append(mpi_native_variant(comm, "mpi-staged", device=True))
            elif name in ("oneshot", "twoshot"):
                variants.append(allreduce_variant(comm, name, algo=name, device=True))
            elif name == "ipc":
                variants += [allreduce_variant(comm, f"ipc:{k}", device=True, transport=f"ipc:{k}")
                             for k in (int(x) for x in args.slices.split(","))]
            else:
                variants.append(allreduce_variant(comm, name, device=True, transport=name))
        base = args.baseline if args.baseline in wanted and (args.baseline not in ("staged", "mpi-staged")
                                                             or size <= staged_max) else None
        rows += measure(comm, variants, [size // itemsize], args.dtype, "sum", iters=args.iters,
                        warmup=args.warmup, baseline=base, progress=lambda t: print("  ..", t, flush=True))
    say(format_table(rows, f"allreduce on GPU, N = {n}; ratio = {args.baseline} time / variant time"))
    floor_rows = []
    for r in rows:
        if r.note or n == 1 or r.variant in ("oneshot", "twoshot"):   # the floor is the ring's traffic
            continue
        floor_s = 5 * (n - 1) * r.size / bw
        floor_rows.append({"variant": r.variant, "size": r.size, "time_us": r.time_us,
                           "floor_us": floor_s * 1e6, "fraction_of_floor": floor_s * 1e6 / r.time_us})
    if comm.rank == 0 and floor_rows:
        print(f"\nHBM floor = 5(N-1)*S / {bw / 1e9:.0f} GB/s")
        print(f"{'variant':>12s} {'size':>12s} {'time_us':>10s} {'floor_us':>10s} {'of floor':>9s}")
        for f in floor_rows:
            print(f"{f['variant']:>12s} {f['size']:>12d} {f['time_us']:10.1f} {f['floor_us']:10.1f} {f['fraction_of_floor']:9.1%}")
    if args.json and comm.rank == 0:
        write_json(args.json, rows, run_metadata(comm, copy_bandwidth_Bps=bw, floor=floor_rows,
                                                 device=cupy.cuda.runtime.getDeviceProperties(gpu)["name"].decode()))
    return 1 if any(r.wrong > 0 for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
