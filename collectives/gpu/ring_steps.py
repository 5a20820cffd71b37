"""The IPC rings' pull plan and their reduce step on CuPy buffers (IpcRing and SharedGpuRing run the same steps)."""
from functools import lru_cache

from ringlab import settings
from ringlab.kernels.cuda_reduce import reduce_kernel_vec
from ringlab.kernels.optable import OP_TABLE
from ringlab.schedule import chunk_bounds, ring_allgather_schedule, ring_reduce_scatter_schedule

__all__ = ["ring_pull_plan", "reduce_step", "VECTOR", "STEP_TYPES"]

_EXPR = {name: op.c_expr for name, op in OP_TABLE.items()}    # kernels/optable.py (NaN as numpy.maximum)
_kernels = {}
VECTOR = settings.get("RINGLAB_IPC_VECTOR")   # 16-byte kernel (0: CuPy elementwise)
STEP_TYPES = ("float16", "float32", "float64", "int32", "int64") if VECTOR else ()


def _kernel(op, last_avg=False):
    """out = a (op) b, elementwise, one read of each input and one write (CuPy-compiled, cached)."""
    import cupy
    key = (op, last_avg)
    if key not in _kernels:
        if last_avg:
            _kernels[key] = cupy.ElementwiseKernel("T a, T b, T n", "T out", "out = (a + b) / n", "ringlab_avg_last")
        else:
            _kernels[key] = cupy.ElementwiseKernel("T a, T b", "T out", _EXPR[op], f"ringlab_{op}")
    return _kernels[key]


def reduce_step(op, src, peer, out, n, last):
    """out = src (op) peer on the current stream; avg divides at the last reduce-scatter step."""
    if VECTOR and reduce_kernel_vec(src, peer, out, "avg_last" if last and op == "avg" else op, n):
        return
    if last and op == "avg":
        _kernel(op, last_avg=True)(src, peer, src.dtype.type(n), out)
    else:
        _kernel(op)(src, peer, out)


@lru_cache(maxsize=64)
def ring_pull_plan(nranks, count):
    """The ring of schedule.py as pulls: ``plan[step][rank] = (lo, hi, reduce, from_input)``.

    At each step a rank receives the schedule's ``recv_chunk`` from its left neighbour; pulling it,
    the rank reads the neighbour's *input* at the first reduce-scatter step (nothing is reduced
    yet) and its *output* afterwards, and reduces (reduce-scatter) or copies (all-gather).
    """
    bounds = chunk_bounds(count, nranks)
    rs = [ring_reduce_scatter_schedule(k, nranks) for k in range(nranks)]
    ag = [ring_allgather_schedule(k, nranks) for k in range(nranks)]
    plan = [tuple((*bounds[rs[k][s].recv_chunk], True, s == 0) for k in range(nranks)) for s in range(nranks - 1)]
    plan += [tuple((*bounds[ag[k][s].recv_chunk], False, False) for k in range(nranks)) for s in range(nranks - 1)]
    return tuple(plan)
