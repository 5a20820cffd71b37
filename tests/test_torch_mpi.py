"""torch over real ``mpirun -n K`` runs: DDP hooks vs gloo, bf16, futures, error feedback, the "ringlab" backend."""
import json
import os
import re

import pytest

if os.environ.get("CI"):
    import torch  # noqa: F401 - CI installs torch (.ci/run): there a missing torch fails instead of skipping
else:
    pytest.importorskip("torch", reason="torch not installed (pip install -e '.[torch]')")

WORKER = "tests/mpi/torch_ddp.py"
TINY = ["--steps", "8", "--inputs", "16", "--hidden", "32", "--layers", "2", "--batch", "8", "--bucket-mb", "0.004"]
ENV = {"RINGLAB_TIMEOUT": "60"}


def _ok_lines(res, n):
    """Every rank's ``OK rank R ...`` report (ranks' lines may interleave in mpirun's stdout)."""
    reports = re.findall(r"OK rank (\d+)(.*?)(?=OK rank|\n|$)", res.stdout)
    assert sorted(int(r) for r, _ in reports) == list(range(n)), res.stdout[-3000:] + res.stderr[-3000:]
    return [text for _, text in reports]


def test_ring_hooks_and_backend_match_gloo_bitwise_ranks(run_mpi):
    """Ring hook (overlapped and not) and the ringlab process group train to gloo's losses; ranks agree bitwise."""
    checks = json.dumps({"exact": ["ring", "ringlab-pg"], "rtol": 1e-5})
    res = run_mpi(4, WORKER, "train", checks, *TINY, "--variants", "gloo,ring,ringlab-pg", timeout=240, env=ENV)
    _ok_lines(res, 4)
    res = run_mpi(3, WORKER, "train", json.dumps({"exact": ["ring"]}), *TINY, "--variants", "gloo,ring",
                  "--no-overlap", "--algo", "auto", timeout=240, env=ENV)
    _ok_lines(res, 3)


def test_bfloat16_model_trains_through_the_ring_hook(run_mpi):
    checks = json.dumps({"exact": ["ring"], "rtol": 2e-2})   # bf16 sums in another order than gloo's
    res = run_mpi(3, WORKER, "train", checks, *TINY, "--dtype", "bfloat16", "--variants", "gloo,ring",
                  timeout=240, env=ENV)
    _ok_lines(res, 3)


def test_fp8_hooks_train_and_keep_ranks_identical(run_mpi):
    res = run_mpi(4, WORKER, "train", json.dumps({}), *TINY, "--variants", "gloo,fp8,fp8-ef", timeout=240, env=ENV)
    for line in _ok_lines(res, 4):
        losses = dict(re.findall(r"([\w-]+)=([0-9.]+)", line))
        for v in ("fp8", "fp8-ef"):
            assert abs(float(losses[v]) / float(losses["gloo"]) - 1) < 0.02, line


def test_error_feedback_shrinks_the_accumulated_fp8_error(run_mpi):
    res = run_mpi(4, WORKER, "ef", timeout=180, env=ENV)
    _ok_lines(res, 4)


def test_futures_complete_on_the_progress_thread(run_mpi):
    res = run_mpi(3, WORKER, "futures", timeout=120, env=ENV)
    _ok_lines(res, 3)


def test_bucket_sizes_that_differ_across_ranks_raise_on_every_rank(run_mpi):
    res = run_mpi(3, WORKER, "mismatch", timeout=120, env=ENV)
    _ok_lines(res, 3)


def test_torch_distributed_backend_ringlab(run_mpi):
    res = run_mpi(3, WORKER, "backend", timeout=120, env=ENV)
    _ok_lines(res, 3)


@pytest.mark.gpu
def test_ddp_hooks_on_cuda_tensors(run_mpi):
    """CUDA buckets through the hooks' CuPy paths (for a device run: skipped without a GPU)."""
    from ringlab.arrays import gpu_available
    import torch
    if not gpu_available() or not torch.cuda.is_available():
        pytest.skip("no usable CUDA GPU with CuPy and torch.cuda")
    res = run_mpi(2, WORKER, "train", json.dumps({"exact": ["ring", "ring-inline"], "rtol": 1e-4}), *TINY,
                  "--device", "cuda", "--variants", "gloo,ring,ring-inline,fp8,fp8-ef", timeout=300, env=ENV)
    _ok_lines(res, 2)
