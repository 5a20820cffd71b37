"""The one op/dtype table: every reduction ringlab offers, how each kernel family spells it, which dtypes it takes."""
# Every reducer reads this table: the host ring (NumPy ufuncs), the CUDA C IPC kernels (op codes, CuPy
# expressions), the numba kernels, the device ring and the NCCL baseline. ``avg`` reduces as a sum and
# divides once at the chunk's owner; max/min propagate NaN as ``numpy.maximum``/``minimum`` do.

from dataclasses import dataclass

__all__ = ["Op", "OPS", "OP_TABLE", "combine_of", "HOST_DTYPES", "DEVICE_DTYPES", "FLOAT_DTYPES", "INT_DTYPES"]


@dataclass(frozen=True)
class Op:
    name: str
    combine: str      # the elementwise reduction applied at each hop ("sum" for avg)
    code: int         # the op code of the CUDA C and numba kernels (4: avg's final hop, sum then / N)
    ufunc: str        # NumPy/CuPy ufunc of the combine
    c_expr: str       # CuPy ElementwiseKernel body, out = a (op) b
    nccl: int         # ncclRedOp_t (avg: NCCL >= 2.10)


OP_TABLE = {op.name: op for op in [
    Op("sum", "sum", 0, "add", "out = a + b", 0),
    Op("prod", "prod", 1, "multiply", "out = a * b", 1),
    Op("max", "max", 2, "maximum", "out = (b > a || b != b) ? b : a", 2),
    Op("min", "min", 3, "minimum", "out = (b < a || b != b) ? b : a", 3),
    Op("avg", "sum", 0, "add", "out = a + b", 4),
]}
OPS = tuple(OP_TABLE)
AVG_LAST_CODE = 4     # the kernels' code for avg's last hop: (a + b) / N

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INT_DTYPES = ("int32", "int64")
HOST_DTYPES = FLOAT_DTYPES + INT_DTYPES                           # the host ring (bfloat16 from ml_dtypes)
DEVICE_DTYPES = ("float16", "float32", "float64", "int32", "int64")  # the IPC/device kernels (CuPy has no bf16)


def combine_of(op):
    """The per-hop reduction of ``op`` (``avg`` -> ``sum``); unknown names raise ValueError."""
    try:
        return OP_TABLE[op].combine
    except KeyError:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}") from None
