"""ringlab: ring all-reduce = reduce-scatter + all-gather over mpi4py, on NumPy or CuPy buffers."""
__version__ = "0.2.0"

from ringlab import algorithms
from ringlab import hierarchical
from ringlab.bench import auto as _auto
from ringlab.api import ALLREDUCE_ALGORITHMS, allgather, allreduce, reduce_scatter, register_allreduce
from ringlab.errors import CollectiveError, CollectiveMismatch, CollectiveTimeout
from ringlab.fp8 import allreduce_fp8  # also registers algo="fp8-ring" and "fp8-direct"
from ringlab.schedule import chunk_bounds, reduce_scatter_owner, ring_allgather_schedule, ring_reduce_scatter_schedule
from ringlab.validate import InvalidCollectiveCall
from ringlab.work import Work, allgather_async, allreduce_async, reduce_scatter_async

__all__ = ["__version__", "allreduce", "reduce_scatter", "allgather", "allreduce_fp8", "register_allreduce", "ALLREDUCE_ALGORITHMS",
           "allreduce_async", "reduce_scatter_async", "allgather_async", "Work",
           "chunk_bounds", "reduce_scatter_owner", "ring_reduce_scatter_schedule", "ring_allgather_schedule",
           "CollectiveError", "CollectiveTimeout", "CollectiveMismatch", "InvalidCollectiveCall"]

algorithms.register_all()     # the beyond-ring host algorithms (algorithms.py)
hierarchical.register_all()
_auto.register()               # algo="auto": the tuner's choice (bench/auto.py)
