"""NCCL baseline through ``cupy.cuda.nccl``: unique id broadcast over MPI, one GPU per rank."""
from mpi4py import MPI

from ringlab.kernels.optable import OP_TABLE

__all__ = ["nccl_unavailable_reason", "NcclAllreduce"]

_NCCL_OPS = {name: op.nccl for name, op in OP_TABLE.items()}           # ncclRedOp_t (kernels/optable.py)
_NCCL_TYPES = {"int32": 2, "int64": 4, "float16": 6, "float32": 7, "float64": 8}  # ncclDataType_t


def nccl_unavailable_reason(comm):
    """None if NCCL can run on ``comm``, else why not (the same text on every rank)."""
    reason = None
    try:
        import cupy
        from cupy.cuda import nccl  # noqa: F401
        dev = cupy.cuda.Device()
        ident = (MPI.Get_processor_name(), dev.pci_bus_id)
    except Exception as exc:  # no cupy, no NCCL in this CuPy build, no GPU
        reason, ident = f"NCCL unavailable ({type(exc).__name__}: {exc})", None
    everyone = comm.allgather((reason, ident))
    reasons = [r for r, _ in everyone if r]
    if reasons:
        return reasons[0]
    idents = [i for _, i in everyone]
    if len(set(idents)) < len(idents):
        return (f"NCCL needs one GPU per rank: {comm.size} ranks share {len(set(idents))} GPU(s) "
                "(NCCL refuses duplicate GPUs)")
    return None


class NcclAllreduce:
    """A NCCL communicator over the ranks of ``comm``; ``__call__(src, out, op)`` on the current stream."""

    def __init__(self, comm):
        from cupy.cuda import nccl
        uid = nccl.get_unique_id() if comm.rank == 0 else None
        uid = comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(comm.size, uid, comm.rank)

    def __call__(self, src, out, op="sum"):
        import cupy
        name = src.dtype.name
        if name not in _NCCL_TYPES:
            raise TypeError(f"NCCL baseline: unsupported dtype {name}")
        self.comm.allReduce(src.data.ptr, out.data.ptr, src.size, _NCCL_TYPES[name], _NCCL_OPS[op],
                            cupy.cuda.get_current_stream().ptr)
