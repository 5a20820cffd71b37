"""FP8 all-reduce over real mpirun (NumPy path): ring and direct vs a simulation, bounds, policy, errors."""
import json

import pytest


@pytest.mark.parametrize("nprocs", [1, 2, 3, 5])
def test_fp8_allreduce(run_mpi, nprocs):
    res = run_mpi(nprocs, "tests/mpi/fp8_allreduce_check.py", timeout=120)
    assert f"checks on {nprocs} ranks" in res.stdout and res.stdout.startswith("OK")


def test_fp8_allreduce_in_codec_pieces(run_mpi):
    """Chunks cut into pieces of 2 blocks by the host codec: still bitwise the one-process simulation."""
    res = run_mpi(3, "tests/mpi/fp8_allreduce_check.py", "--small-pieces", timeout=120)
    assert "checks on 3 ranks" in res.stdout and res.stdout.startswith("OK")


@pytest.mark.parametrize("nprocs", [2, 3])
def test_fp8_allreduce_in_several_passes(run_mpi, nprocs):
    """Every chunk cut into block-aligned parts, one ring (or direct exchange) per part: bitwise the simulation."""
    res = run_mpi(nprocs, "tests/mpi/fp8_allreduce_check.py", "--small-passes", timeout=120)
    assert f"checks on {nprocs} ranks" in res.stdout and res.stdout.startswith("OK")


def test_fp8_allreduce_8_ranks(run_mpi):
    res = run_mpi(8, "tests/mpi/fp8_allreduce_check.py", "--quick", timeout=180)
    assert "checks on 8 ranks" in res.stdout


def test_experiment_smoke(run_mpi, tmp_path):
    """The measurement script runs end to end on a tiny configuration, writes JSON and a plot."""
    out, png = tmp_path / "fp8.json", tmp_path / "fp8.png"
    res = run_mpi(3, "experiments/fp8_compression.py", "--count", "4096", "--sizes", "64K", "--iters", "2",
                  "--warmup", "1", "--json", str(out), "--plot", str(png), timeout=180)
    data = json.loads(out.read_text())
    errors = data["accuracy"]
    assert {r["algo"] for r in errors} >= {"ring", "direct"} and {r["nranks"] for r in errors} >= {2, 3}
    assert all(0 < r["rel_l2"] < 0.5 for r in errors if r["algo"] in ("ring", "direct"))
    assert all(r["wrong"] == 0 for r in data["speed"] if not r["note"])
    assert png.exists() and png.stat().st_size > 1000
    assert "kernel speed: skipped" in res.stdout


@pytest.mark.parametrize("nprocs", [1, 2, 3, 4, 8])
def test_fp8_ipc_message_plan(run_mpi, nprocs):
    """The IPC FP8 ring's slot plan gives the MPI FP8 ring's bytes (executed with NumPy on CPU)."""
    res = run_mpi(nprocs, "tests/mpi/fp8_ipc_plan_check.py", timeout=180)
    assert res.stdout.startswith("OK") and f"on {nprocs} ranks" in res.stdout
