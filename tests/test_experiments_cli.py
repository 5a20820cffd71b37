"""Experiments fail in one line, up front: impossible flag combinations, GPU-only scripts on a CPU
machine (``--help`` still works); their output stays readable (walkthrough columns, no raw warnings)."""
import re
import subprocess
import sys

import pytest

from conftest import ROOT, mpi_env
from ringlab.arrays import gpu_available
from ringlab.bench.harness import GPU_UNAVAILABLE_EXIT, busbw_factor

GPU_ONLY = ["ipc_microbench.py", "launch_overhead.py", "gpu_datapath.py", "device_ring_bench.py",
            "device_latency_bench.py", "device_fp8_bench.py", "device_fp8_onelaunch.py"]


def test_impossible_dtype_op_is_one_line_not_tracebacks(run_mpi):
    res = run_mpi(2, "experiments/ring.py", "--dtype", "int32", "--op", "avg", check=False, timeout=60)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    lines = [l for l in res.stderr.splitlines() if "error:" in l]
    assert len(lines) == 1 and "op 'avg' needs a floating dtype" in lines[0], res.stderr


@pytest.mark.parametrize("script", GPU_ONLY)
def test_gpu_only_experiment_help_always_works(script):
    proc = subprocess.run([sys.executable, f"experiments/{script}", "--help"], cwd=ROOT, env=mpi_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr


@pytest.mark.skipif(gpu_available(), reason="a GPU is usable here: the scripts would run")
@pytest.mark.parametrize("script", GPU_ONLY)
def test_gpu_only_experiment_on_cpu_says_so_in_one_line(script):
    proc = subprocess.run([sys.executable, f"experiments/{script}"], cwd=ROOT, env=mpi_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == GPU_UNAVAILABLE_EXIT, proc.stderr
    assert "Traceback" not in proc.stderr and "--backend" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in proc.stderr


def test_busbw_at_one_rank_is_zero_as_in_nccl_tests():
    assert busbw_factor("allreduce", 1) == 0 and busbw_factor("allgather", 1) == 0
    assert busbw_factor("allreduce", 4) == 1.5


def test_eight_rank_walkthrough_columns_never_touch(run_mpi):
    res = run_mpi(8, "experiments/ring.py", "--no-bench", timeout=120)
    rows = [l for l in res.stdout.splitlines() if " -> " in l and " <- " in l]
    assert len(rows) == 8 * 14, len(rows)
    for row in rows:
        assert re.search(r"-> [a-h]  ", row) and re.search(r"<- [a-h]  +holds", row), row


def test_algorithms_prints_no_raw_warning_mid_table(run_mpi, tmp_path):
    res = run_mpi(2, "experiments/algorithms.py", "--sizes", "8,64K", "--iters", "1", "--warmup", "0",
                  "--algos", "ring,auto", "--no-mpi", timeout=120, env={"RINGLAB_TUNING": str(tmp_path / "none.json")})
    assert "Warning" not in res.stderr and "warnings.warn" not in res.stderr, res.stderr
    assert "auto: no tuning file, built-in defaults" in res.stdout


def test_ncu_hotspots_reads_the_committed_profile():
    """experiments/ncu_hotspots.py over the committed Nsight Compute source page gives docs/fp8.md's numbers."""
    path = f"{ROOT}/docs/results/device_fp8/h200_onelaunch_profile/prof_fp8-ring.sass.csv.gz"
    proc = subprocess.run([sys.executable, "experiments/ncu_hotspots.py", path, "3"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "181431065 warp instructions executed" in proc.stdout
    assert re.search(r"stall reasons: long_sb 43%, barrier 24%", proc.stdout), proc.stdout
    bad = subprocess.run([sys.executable, "experiments/ncu_hotspots.py"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" not in bad.stderr and "ncu --import" in bad.stdout
