"""Worker: hierarchical with N not divisible by ranks_per_node raises the same clear error on every rank
(no hang), and the choice of ``auto`` is the same on every rank at every size."""
import sys

import numpy as np
from mpi4py import MPI

import ringlab
from ringlab.api import _cache

comm = MPI.COMM_WORLD
mode = sys.argv[1]
if mode == "indivisible":
    try:
        ringlab.allreduce(np.ones(10, np.float32), algo="hierarchical")
    except ValueError as exc:
        assert "not divisible by ranks_per_node" in str(exc), exc
        print(f"rank {comm.rank}: raised: {exc}", flush=True)
        sys.exit(0)
    print(f"rank {comm.rank}: no error", flush=True)
    sys.exit(1)
elif mode == "auto_agrees":
    picks = []
    for nbytes in (4, 64, 4096, 65536, 1 << 20, 1 << 22):
        x = np.full(nbytes // 4, comm.rank, np.float32)
        y = ringlab.allreduce(x, algo="auto")
        assert np.all(y == sum(range(comm.size))), "auto result wrong"
        picks.append(_cache("auto")["last_choice"])
    everyone = comm.allgather(picks)
    assert all(p == everyone[0] for p in everyone), everyone
    if comm.rank == 0:
        print("auto picks:", " ".join(picks))
