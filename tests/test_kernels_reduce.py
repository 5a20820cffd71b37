"""Reduce kernels (dst = a op b) vs the NumPy reference, bit for bit, in the CUDA simulator or on a GPU."""
import numpy as np
import pytest
from ml_dtypes import bfloat16

from ringlab import kernels
from ringlab.kernels.reference import reduce_reference

SIM = kernels.use_simulator_without_gpu()
pytest.importorskip("numba")

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")   # simulator: NumPy scalar wrap/NaN

DTYPES = [np.float32, np.float16, bfloat16, np.float64, np.int32, np.int64]
OPS = ["sum", "prod", "max", "min"]


def _xp():
    """(to device, to host): numba device arrays in the simulator, CuPy on a GPU. Explicit device
    arrays matter for in-place calls (the simulator copies each host argument separately).
    bfloat16 travels as uint16 bits, which the kernels read as bfloat16."""
    bits = lambda a: a.view(np.uint16) if a.dtype == bfloat16 else a  # noqa: E731
    if SIM:
        from numba import cuda
        return (lambda a: cuda.to_device(bits(a))), (lambda a, dt: a.copy_to_host().view(dt))
    cupy = pytest.importorskip("cupy")
    return (lambda a: cupy.asarray(bits(a))), (lambda a, dt: cupy.asnumpy(a).view(dt))


def _operands(dtype, n, seed):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "i":
        info = np.iinfo(dtype)        # full range: sums and products wrap, as NumPy's do
        return [rng.integers(info.min, info.max, n, dtype=dtype) for _ in range(2)]
    return [(rng.standard_normal(n) * 2.0 ** rng.integers(-6, 6, n)).astype(dtype) for _ in range(2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", OPS)
def test_reduce_kernel_bit_exact(op, dtype):
    from ringlab.kernels.reduce import reduce_device
    to_dev, to_host = _xp()
    n = 1031 if SIM else (1 << 22) + 3         # odd: a partial grid-stride round, bf16 unpacked path
    a, b = _operands(dtype, n, 0)
    want = reduce_reference(a, b, op)
    da, db = to_dev(a), to_dev(b)
    got = to_host(reduce_device(da, db, op), a.dtype)
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))
    reduce_device(da, db, op, out=da)           # in place: dst = a
    assert np.array_equal(to_host(da, a.dtype).view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("op", OPS)
def test_bf16_packed_and_unaligned_paths_agree(op):
    from ringlab.kernels.reduce import reduce_device
    to_dev, to_host = _xp()
    a, b = _operands(bfloat16, 514, 1)
    want = reduce_reference(a, b, op)
    got_packed = to_host(reduce_device(to_dev(a), to_dev(b), op), bfloat16)         # aligned: 8-byte quads
    da, db = to_dev(a), to_dev(b)
    got_offset = to_host(reduce_device(da[1:], db[1:], op), bfloat16)               # 2-byte offset: scalar path
    assert np.array_equal(got_packed.view(np.uint16), want.view(np.uint16))
    assert np.array_equal(got_offset.view(np.uint16), want[1:].view(np.uint16))


@pytest.mark.parametrize("dtype", [np.float32, bfloat16, np.float16])
def test_max_min_propagate_nan_and_sum_inf(dtype):
    from ringlab.kernels.reduce import reduce_device
    to_dev, to_host = _xp()
    a = np.array([np.nan, 1, 2, np.inf, -np.inf, 0.5], dtype)
    b = np.array([1, np.nan, 3, 1, np.inf, 0.25], dtype)
    for op in ("max", "min"):
        got = to_host(reduce_device(to_dev(a), to_dev(b), op), dtype).astype(np.float32)
        want = reduce_reference(a, b, op).astype(np.float32)
        assert np.array_equal(np.isnan(got), np.isnan(want)) and np.array_equal(got[2:], want[2:]), op
    got = to_host(reduce_device(to_dev(a), to_dev(b), "sum"), dtype).astype(np.float32)
    assert np.isnan(got[:2]).all() and got[3] == np.inf and np.isnan(got[4])


def test_bad_arguments():
    from ringlab.kernels.reduce import reduce_device
    a = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="op"):
        reduce_device(a, a, "avg")
    with pytest.raises(TypeError, match="dtypes differ"):
        reduce_device(a, np.ones(8, np.float64), "sum")
    with pytest.raises(ValueError, match="sizes differ"):
        reduce_device(a, np.ones(7, np.float32), "sum")
    with pytest.raises(TypeError, match="no kernel"):
        reduce_device(np.ones(8, np.uint8), np.ones(8, np.uint8), "sum")


def test_import_kernels_needs_no_numba_and_restores_row_stack(monkeypatch):
    monkeypatch.delattr(np, "row_stack", raising=False)
    kernels.patch_numpy_for_numba()
    assert np.row_stack is np.vstack
