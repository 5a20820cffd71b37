"""Reduction operators and the dtypes each accepts, for NumPy and CuPy arrays alike."""
import numpy as np

from ringlab.kernels import optable

__all__ = ["OPS", "SUPPORTED_DTYPES", "check_op_dtype", "reduce_into", "dtype_name", "dtype_label", "bfloat16"]

try:  # bfloat16 for NumPy comes from ml_dtypes (a core dependency)
    from ml_dtypes import bfloat16
except ImportError:  # pragma: no cover - ml_dtypes is in install_requires
    bfloat16 = None

OPS = optable.OPS                                               # kernels/optable.py: the one op table
_UFUNC = {name: op.ufunc for name, op in optable.OP_TABLE.items()}

_FLOATS = {np.dtype(bfloat16 if d == "bfloat16" else d) for d in optable.FLOAT_DTYPES if d != "bfloat16" or bfloat16}
_INTS = {np.dtype(d) for d in optable.INT_DTYPES}
SUPPORTED_DTYPES = _FLOATS | _INTS


def dtype_name(dtype):
    """Short name used in tables: float32, bfloat16, int64, ..."""
    return np.dtype(dtype).name


def dtype_label(dtype):
    """``dtype_name``, plus the byte order when it is not the machine's: '>f4' is 'float32 (big-endian, >f4)'."""
    label = _labels.get(dtype)
    if label is None:
        dt = np.dtype(dtype)
        label = dt.name if dt.isnative else f"{dt.name} ({'big' if dt.byteorder == '>' else 'little'}-endian, {dt.str})"
        _labels[dtype] = label       # once per dtype: it is part of every call's fingerprint
    return label


_labels = {}


def check_op_dtype(op, dtype):
    """Raise ValueError/TypeError with a clear message if ``op`` cannot reduce ``dtype``."""
    if op not in OPS:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(OPS)}")
    dt = np.dtype(dtype)
    if not dt.isnative:
        raise TypeError(f"unsupported dtype {dtype_label(dt)}: ringlab reduces native-byte-order arrays only; "
                        f"convert with x.astype(x.dtype.newbyteorder('='))")
    if dt not in SUPPORTED_DTYPES:
        names = ", ".join(sorted(dtype_name(d) for d in SUPPORTED_DTYPES))
        raise TypeError(f"unsupported dtype {dt.name}; supported: {names}")
    if op == "avg" and dt in _INTS:
        raise TypeError(f"op 'avg' needs a floating dtype, got {dt.name} (integer average would truncate)")


def reduce_into(dst, src, op, xp=np):
    """dst = dst (op) src, in place; ``avg`` accumulates as a sum (the caller divides once)."""
    ufunc = _UFUNC.get(op)
    if ufunc is None:
        raise ValueError(f"unknown op {op!r}")
    getattr(xp, ufunc)(dst, src, out=dst)
