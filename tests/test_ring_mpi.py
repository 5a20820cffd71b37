"""Ring reduce-scatter / all-gather / all-reduce under real `mpirun -n K`, against float64 references."""
import pytest

ALL_DTYPES = "float16,float32,float64,bfloat16,int32,int64"
ALL_OPS = "sum,prod,max,min,avg"


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 8])
def test_every_dtype_and_op_small_counts(run_mpi, k):
    counts = ",".join(str(c) for c in sorted({0, 1, max(k - 1, 0), 1009}))
    out = run_mpi(k, "tests/mpi/ring_check.py", counts, ALL_DTYPES, ALL_OPS, timeout=300).stdout
    assert f"ring_check OK: N={k}" in out


@pytest.mark.parametrize("k", [3, 8])
def test_large_odd_count(run_mpi, k):
    out = run_mpi(k, "tests/mpi/ring_check.py", "100003", "float32,int64,float16", "sum,max,avg", timeout=300).stdout
    assert f"ring_check OK: N={k}" in out


@pytest.mark.parametrize("k", [1, 3, 4])
def test_bad_input_raises_everywhere(run_mpi, k):
    assert "bad_input OK" in run_mpi(k, "tests/mpi/bad_input.py", timeout=120).stdout


def test_main_command_walkthrough_verify_and_benchmark(run_mpi):
    out = run_mpi(4, "experiments/ring.py", "--sizes", "4K,100K", "--iters", "3", "--warmup", "1", timeout=300).stdout
    assert "a0 (=1) -> b" in out and "d3 (=8) <- d" in out        # seed 004's first step
    assert "every element = 2**N - 1 = 15: yes" in out
    assert out.count("PASS") == 5 and "FAIL" not in out
    table = [ln for ln in out.splitlines() if ln.strip().startswith(("ring ", "mpi-native "))]
    assert len(table) == 4 and all(ln.split()[-2] == "0" for ln in table)  # #wrong == 0


def test_main_command_help():
    import subprocess
    import sys
    from conftest import ROOT, mpi_env
    out = subprocess.run([sys.executable, "experiments/ring.py", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=mpi_env(), timeout=60)
    assert out.returncode == 0
    for flag in ("--sizes", "--iters", "--dtype", "--op", "--backend", "--quiet"):
        assert flag in out.stdout
