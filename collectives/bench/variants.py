"""Benchmark variants shared by the experiments: ringlab's algorithms and the baselines."""
# Each returns a ``bench.Variant``; buffers live on the GPU (CuPy) when ``device`` is True, else
# on the host (NumPy). Inputs come from ``bench.pattern`` so the check is exact and independent.

import numpy as np
from mpi4py import MPI

from ringlab import api
from ringlab.bench.harness import Case, Unavailable, Variant, count_wrong, pattern, reference

__all__ = ["allreduce_variant", "fp8_variant", "mpi_native_variant", "nccl_variant", "array_module_for"]

_MPI_OPS = {"sum": MPI.SUM, "avg": MPI.SUM, "prod": MPI.PROD, "max": MPI.MAX, "min": MPI.MIN}
_MPI_TYPES = {"float32", "float64", "int32", "int64"}


def array_module_for(device):
    if device:
        import cupy
        return cupy
    return np


def _inputs(comm, count, dtype, op, device):
    xp = array_module_for(device)
    if device and dtype == "bfloat16":
        raise Unavailable("bfloat16 device arrays need a CuPy with bfloat16")
    x = pattern(count, dtype, comm.rank, op, xp)
    ref = reference(count, comm.size, op, xp)
    return xp, x, ref


def _sync(device):
    if device:
        import cupy
        return cupy.cuda.get_current_stream().synchronize
    return lambda: None


def _stream(device):
    if device:
        import cupy
        return cupy.cuda.get_current_stream()
    return None


def allreduce_variant(comm, name="ring", algo="ring", device=False, dtype=None, bytes_per_element=None, **kwargs):
    """ringlab's ``allreduce(x, out=y, algo=algo)``, out of place so the input stays fixed.

    ``dtype`` fixes this variant's element type (else the benchmark's); ``bytes_per_element`` makes
    algbw count that many bytes per element (e.g. 4 for a bf16 row beside fp32 rows), else the dtype's.
    """
    fixed = dtype

    def prepare(count, dtype, op):
        dtype = fixed or dtype
        xp, x, ref = _inputs(comm, count, dtype, op, device)
        y = xp.empty_like(x)
        return Case(run=lambda: api.allreduce(x, out=y, op=op, algo=algo, comm=comm, validate=False, **kwargs),
                    wrong=lambda: count_wrong(y, ref, dtype, op, comm.size, xp),
                    sync=_sync(device), stream=_stream(device),
                    nbytes=None if bytes_per_element is None else bytes_per_element * count)
    return Variant(name, prepare)


def fp8_variant(comm, algo="ring", fmt="e4m3", block=128, device=False, transport=None):
    """``allreduce_fp8`` on fp32 pattern data (|x| <= 4); #wrong counts elements outside
    ``fp8_allreduce_error_bound``. ``transport`` (device only) picks the device transport."""
    from ringlab.fp8 import allreduce_fp8, fp8_allreduce_error_bound

    def prepare(count, dtype, op):
        xp, x, ref = _inputs(comm, count, "float32", op, device)
        y = xp.empty_like(x)
        bound = fp8_allreduce_error_bound(fmt, comm.size, 4.0, algo, op)
        return Case(run=lambda: allreduce_fp8(x, out=y, fmt=fmt, block=block, algo=algo, op=op, comm=comm,
                                              validate=False, transport=transport),
                    wrong=lambda: int((~(xp.abs(y.astype(xp.float64) - ref) <= bound)).sum()),
                    sync=_sync(device), stream=_stream(device))
    return Variant(f"fp8 {fmt} {algo}" + (f" {transport}" if transport else ""), prepare)


def mpi_native_variant(comm, name="mpi-native", device=False):
    """The MPI library's own ``Allreduce`` on the same data (staged through host memory for device
    buffers when MPI is not CUDA-aware, which is the honest comparison for the staged ring)."""
    def prepare(count, dtype, op):
        if dtype not in _MPI_TYPES:
            raise Unavailable(f"MPI has no standard {dtype} type")
        xp, x, ref = _inputs(comm, count, dtype, op, device)
        y = xp.empty_like(x)
        mop = _MPI_OPS[op]
        if device:
            hx = np.empty(count, dtype=dtype)
            hy = np.empty(count, dtype=dtype)

            def run():
                x.get(out=hx)
                comm.Allreduce(hx, hy, op=mop)
                if op == "avg":
                    hy[...] /= comm.size
                y.set(hy)
        else:
            def run():
                comm.Allreduce(x, y, op=mop)
                if op == "avg":
                    y[...] /= comm.size
        return Case(run=run, wrong=lambda: count_wrong(y, ref, dtype, op, comm.size, xp),
                    sync=_sync(device), stream=_stream(device))
    return Variant(name, prepare)


def nccl_variant(comm, name="nccl"):
    """NCCL's all-reduce on the same device buffers; n/a (with the reason) when ranks share a GPU."""
    state = {}

    def prepare(count, dtype, op):
        from ringlab.gpu.nccl import NcclAllreduce, nccl_unavailable_reason
        if "reason" not in state:
            state["reason"] = nccl_unavailable_reason(comm)
            if state["reason"] is None:
                state["comm"] = NcclAllreduce(comm)
        if state["reason"]:
            raise Unavailable(state["reason"])
        if dtype not in ("float16", "float32", "float64", "int32", "int64"):
            raise Unavailable(f"no {dtype} device arrays in this CuPy")
        xp, x, ref = _inputs(comm, count, dtype, op, True)
        y = xp.empty_like(x)
        return Case(run=lambda: state["comm"](x, y, op), wrong=lambda: count_wrong(y, ref, dtype, op, comm.size, xp),
                    sync=_sync(True), stream=_stream(True))
    return Variant(name, prepare)
