"""torch tensors in ringlab (one process): zero-copy views of every dtype, bf16, torch in -> torch out, futures."""
import os
import subprocess
import sys

import numpy as np
import pytest

if os.environ.get("CI"):
    import torch  # CI installs torch (.ci/run): there a missing torch fails instead of skipping
else:
    torch = pytest.importorskip("torch", reason="torch not installed (pip install -e '.[torch]')")

from ml_dtypes import bfloat16  # noqa: E402

import ringlab  # noqa: E402
from ringlab import ddp_hooks  # noqa: E402
from ringlab.arrays import as_array, is_torch_tensor, to_torch, wrap_like  # noqa: E402
from ringlab.kernels.reference import dequantize_fp8_blockwise, quantize_fp8_blockwise  # noqa: E402
from ringlab.schedule import chunk_bounds  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
          torch.bfloat16: bfloat16, torch.int32: np.int32, torch.int64: np.int64}


def test_import_ringlab_never_imports_torch():
    code = "import sys, ringlab, ringlab.work, ringlab.fp8; assert 'torch' not in sys.modules, 'torch imported'"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr[-2000:]


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_as_array_is_a_zero_copy_view_of_every_dtype(dtype):
    t = torch.arange(12, dtype=dtype).reshape(3, 4)
    a = as_array(t)
    assert a.dtype == np.dtype(DTYPES[dtype]) and a.shape == (3, 4)
    a[1, 2] = 100
    assert t[1, 2].item() == 100, "writes go through to the tensor"
    back = to_torch(a)
    assert back.dtype == dtype and back.data_ptr() == t.data_ptr() and torch.equal(back, t)


def test_bfloat16_bits_survive_both_ways():
    t = torch.tensor([1.0, -2.5, 3.0e38, 1e-40, float("inf"), float("nan")], dtype=torch.bfloat16)
    a = as_array(t)
    assert np.array_equal(a.view(np.uint16), t.view(torch.int16).numpy().view(np.uint16))
    assert torch.equal(to_torch(a).view(torch.int16), t.view(torch.int16))


def test_requires_grad_is_a_clear_error_and_detach_works():
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(TypeError, match=r"detach\(\)"):
        as_array(p)
    a = as_array(p.detach())
    a[0] = 3
    assert p[0].item() == 3, "detach() shares the parameter's memory"


def test_wrap_like_returns_the_callers_array_type():
    t, n = torch.zeros(3), np.ones(3)
    assert is_torch_tensor(wrap_like(t, n)) and wrap_like(t, n).data_ptr() == n.ctypes.data
    out = torch.empty(3)
    assert wrap_like(t, as_array(out), out) is out
    assert wrap_like(n, n) is n and wrap_like(n, n, n) is n


@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
def test_allreduce_on_one_rank_in_and_out_of_place(dtype):
    t = torch.arange(10, dtype=dtype)
    res = ringlab.allreduce(t)                       # out of place: a new tensor, same type as the input
    assert torch.equal(wrap_like(t, res), t)
    assert ringlab.allreduce(t, out=t) is not None   # in place
    out = torch.empty_like(t)
    ringlab.allreduce(t, out=out)
    assert torch.equal(out, t)


def test_torch_in_torch_out():
    """out=None returns a torch tensor for torch input (``@returns_input_type`` on the api's collectives)."""
    t = torch.arange(8, dtype=torch.bfloat16)
    for res in (ringlab.allreduce(t), ringlab.reduce_scatter(t), ringlab.allgather(t)):
        assert isinstance(res, torch.Tensor) and res.dtype == torch.bfloat16, type(res)
    out = torch.empty_like(t)
    assert ringlab.allreduce(t, out=out) is out and ringlab.allreduce(t, out=t) is t
    assert isinstance(ringlab.allreduce(np.ones(3)), np.ndarray)


def test_torch_in_torch_out_fp8():
    assert isinstance(ringlab.allreduce_fp8(torch.ones(8)), torch.Tensor)


def test_future_of_an_async_allreduce():
    t = torch.full((5,), 2.0, dtype=torch.bfloat16)
    fut = ringlab.allreduce_async(t, out=t).get_future()
    assert isinstance(fut, torch.futures.Future)
    value = fut.then(lambda f: f.value() + 1).wait()
    assert value.dtype == torch.bfloat16 and torch.equal(value, torch.full((5,), 3.0, dtype=torch.bfloat16))
    bad = ringlab.allreduce_async(torch.ones(3, dtype=torch.int32), op="avg").get_future()
    with pytest.raises(Exception, match="avg"):
        bad.wait()


def test_local_fp8_error_is_what_the_chunk_messages_lose():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(1000) * np.exp(rng.standard_normal(1000))).astype(np.float32)
    for algo, rank in (("ring", 1), ("direct", 2)):
        err = ddp_hooks.local_fp8_error(x, 4, rank, "e4m3", 64, algo)
        for c, (lo, hi) in enumerate(chunk_bounds(x.size, 4)):
            if algo == "direct" and c == rank:
                assert not err[lo:hi].any(), "direct never quantizes the rank's own chunk"
                continue
            codes, scales = quantize_fp8_blockwise(x[lo:hi], "e4m3", 64)
            assert np.array_equal(x[lo:hi] - err[lo:hi], dequantize_fp8_blockwise(codes, scales, "e4m3", 64))


def test_wire_bytes_per_rank():
    assert ddp_hooks.wire_bytes_per_rank(1024, 4) == 2 * 3 * 256 * 4
    assert ddp_hooks.wire_bytes_per_rank(1024, 4, fp8_block=128) == 2 * 3 * (256 + 2 * 4)
    assert ddp_hooks.wire_bytes_per_rank(1024, 1) == 0


@pytest.mark.gpu
def test_cuda_tensors_use_the_cupy_path():
    """CUDA tensors go through CuPy zero-copy (run by the lead on the device)."""
    from ringlab.arrays import gpu_available
    if not gpu_available() or not torch.cuda.is_available():
        pytest.skip("no usable CUDA GPU with CuPy and torch.cuda")
    t = torch.arange(10, dtype=torch.float32, device="cuda")
    a = as_array(t)
    assert type(a).__module__.startswith("cupy") and a.data.ptr == t.data_ptr()
    res = ringlab.allreduce(t)
    assert isinstance(res, torch.Tensor) and res.is_cuda and torch.equal(res, t)
    ringlab.allreduce(t, out=t)
    fut = ringlab.allreduce_async(t, out=t).get_future()
    assert torch.equal(fut.wait(), torch.arange(10, dtype=torch.float32, device="cuda"))
    h = torch.ones(64, dtype=torch.bfloat16, device="cuda")
    try:
        ringlab.allreduce(h, out=h)
    except TypeError as exc:   # CuPy without bfloat16: the documented, clear refusal
        assert "bfloat16" in str(exc)
