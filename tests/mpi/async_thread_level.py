"""Async collectives refuse to start without MPI_THREAD_MULTIPLE, with a clear message."""
import mpi4py

mpi4py.rc.thread_level = "serialized"
from mpi4py import MPI  # noqa: E402

import numpy as np  # noqa: E402

from ringlab.work import allreduce_async  # noqa: E402

assert MPI.Query_thread() < MPI.THREAD_MULTIPLE, "MPI gave THREAD_MULTIPLE anyway; cannot test"
try:
    allreduce_async(np.ones(4, dtype=np.float32))
    raise AssertionError("allreduce_async started without MPI_THREAD_MULTIPLE")
except RuntimeError as exc:
    assert "MPI_THREAD_MULTIPLE" in str(exc) and "SERIALIZED" in str(exc), exc
    print(f"rank {MPI.COMM_WORLD.rank}: refused: {exc}", flush=True)
