"""Peak RSS growth per rank of one collective, in input sizes (1.0 = the input alone).

    MALLOC_MMAP_THRESHOLD_=131072 mpirun -n 4 python tests/mpi/peak_memory.py [--mb 32]

Every case runs once first (MPI allocates its own transfer buffers once); then for each case the scratch
caches are emptied, the kernel's peak-RSS mark is reset
(/proc/self/clear_refs, "5") and the call's VmHWM - VmRSS before is divided by the input's bytes.
Prints "peak <case> <ratio>" per case (the worst rank's); the fixed malloc threshold keeps freed
buffers from lingering in the heap between cases.
"""
import argparse
import gc

import numpy as np
from mpi4py import MPI

import ringlab
from ringlab import api


def _kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def peak_ratio(comm, call, nbytes):
    api._scratch.caches = {}          # this thread's receive/staging buffers: allocated inside the call
    gc.collect()
    comm.Barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                  # VmHWM := VmRSS
    before = _kib("VmRSS")
    result = call()
    grown = (_kib("VmHWM") - before) * 1024
    del result
    comm.Barrier()
    return comm.allreduce(1.0 + grown / nbytes, op=MPI.MAX)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--mb", type=int, default=32)
    args = p.parse_args()
    comm = MPI.COMM_WORLD
    x = np.full(args.mb * (1 << 20) // 4, comm.rank + 1, np.float32)   # touched: resident before any case
    cases = {"reduce_scatter": lambda: ringlab.reduce_scatter(x),
             "allreduce ring in place": lambda: ringlab.allreduce(x, out=x)}
    for algo in ("ring", "recursive_doubling", "rabenseifner", "ring_bidir", "direct", "hierarchical", "auto",
                 "fp8-ring", "fp8-direct"):
        cases[f"allreduce {algo}"] = (lambda algo=algo: ringlab.allreduce(x, algo=algo))
    for call in cases.values():      # MPI's own buffers (shared-memory copy slots) are made once, not per call
        call()
    x[...] = comm.rank + 1
    for name, call in cases.items():
        ratio = peak_ratio(comm, call, x.nbytes)
        if name == "allreduce ring in place":
            x[...] = comm.rank + 1
        if comm.rank == 0:
            print(f"peak {name} {ratio:.3f}", flush=True)


if __name__ == "__main__":
    main()
