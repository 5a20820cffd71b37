"""ringlab collectives: ring all-reduce = reduce-scatter + all-gather, over mpi4py."""
from . import algorithms, hierarchical
from .api import ALLREDUCE_ALGORITHMS, allgather, allreduce, reduce_scatter, register_allreduce
from .errors import CollectiveError, CollectiveMismatch, CollectiveTimeout
from .fp8 import allreduce_fp8  # also registers algo="fp8-ring" and "fp8-direct"
from .schedule import chunk_bounds, reduce_scatter_owner, ring_allgather_schedule, ring_reduce_scatter_schedule
from .validate import InvalidCollectiveCall
from .work import Work, allgather_async, allreduce_async, reduce_scatter_async

__all__ = ["allreduce", "reduce_scatter", "allgather", "allreduce_fp8", "register_allreduce", "ALLREDUCE_ALGORITHMS",
           "allreduce_async", "reduce_scatter_async", "allgather_async", "Work",
           "chunk_bounds", "reduce_scatter_owner", "ring_reduce_scatter_schedule", "ring_allgather_schedule",
           "CollectiveError", "CollectiveTimeout", "CollectiveMismatch", "InvalidCollectiveCall"]

algorithms.register_all()     # the beyond-ring host algorithms and "auto" (collectives/algorithms.py)
hierarchical.register_all()
