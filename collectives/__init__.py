"""ringlab collectives: ring all-reduce = reduce-scatter + all-gather, over mpi4py."""
from .api import ALLREDUCE_ALGORITHMS, allgather, allreduce, reduce_scatter, register_allreduce
from .errors import CollectiveError, CollectiveMismatch, CollectiveTimeout
from .schedule import chunk_bounds, reduce_scatter_owner, ring_allgather_schedule, ring_reduce_scatter_schedule
from .validate import InvalidCollectiveCall
from .fp8 import allreduce_fp8  # noqa: E402  (also registers algo="fp8-ring" and "fp8-direct")

__all__ = ["allreduce", "reduce_scatter", "allgather", "register_allreduce", "ALLREDUCE_ALGORITHMS",
           "chunk_bounds", "reduce_scatter_owner", "ring_reduce_scatter_schedule", "ring_allgather_schedule",
           "CollectiveError", "CollectiveTimeout", "CollectiveMismatch", "InvalidCollectiveCall"]
from .work import Work, allgather_async, allreduce_async, reduce_scatter_async  # noqa: E402,F401
