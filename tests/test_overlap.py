"""Overlap patterns: bucket layout in-process; bucketed all-reduce, the chunked TP pipeline and
experiments/overlap.py under real mpirun."""
import json

import pytest

from ringlab.teach.overlap import GradientBuckets

BLAS1 = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def test_buckets_fill_in_reverse_order_and_close_at_the_cap():
    shapes = [(10,), (10,), (10,), (30,), (5,)]          # float32: 40, 40, 40, 120, 20 bytes
    b = GradientBuckets(shapes, "float32", bucket_bytes=80)
    assert [m for m, _, _ in b.buckets] == [(4, 3), (2, 1), (0,)]
    assert b.bucket_nbytes == [140, 80, 40]
    b.grad(3)[...] = 7
    flat = b.buckets[0][1]                               # tensor 4 first (produced first), then 3
    assert flat[:5].tolist() == [0.0] * 5 and flat[5:].tolist() == [7.0] * 30 and b.grad(3).shape == (30,)


def test_bucket_extremes():
    shapes = [(3, 4), (7,), (2, 2, 2)]
    assert len(GradientBuckets(shapes, "float64", 1).buckets) == 3          # one tensor per bucket
    assert len(GradientBuckets(shapes, "float64", 1 << 30).buckets) == 1    # everything fused
    with pytest.raises(ValueError, match="bucket_bytes"):
        GradientBuckets(shapes, "float32", 0)


@pytest.mark.parametrize("nprocs", [1, 3, 4])
def test_bucketed_allreduce_equals_per_tensor(run_mpi, nprocs):
    res = run_mpi(nprocs, "tests/mpi/overlap_ddp.py", timeout=180, env=BLAS1)
    assert res.stdout.count("bucketed all-reduce OK") == nprocs


@pytest.mark.parametrize("nprocs", [2, 5, 8])
def test_chunked_row_parallel_matmul_equals_unsplit(run_mpi, nprocs):
    res = run_mpi(nprocs, "tests/mpi/overlap_tp.py", timeout=180, env=BLAS1)
    assert res.stdout.count("row-parallel pipeline OK") == nprocs


def test_overlap_experiment_small(run_mpi, tmp_path):
    out, png = tmp_path / "overlap.json", tmp_path / "overlap.png"
    res = run_mpi(3, "experiments/overlap.py", "--buckets", "0.01,1", "--layers", "3", "--hidden", "64",
                  "--batch", "8", "--chunks", "1,3", "--tp-m", "33", "--tp-k", "8", "--tp-n", "16",
                  "--iters", "2", "--json", out, "--plot", png, timeout=180)
    assert "effic." in res.stdout and "FAILED" not in res.stdout
    data = json.loads(out.read_text())
    rows = data["overlap"]
    assert [r["pattern"] for r in rows] == ["ddp", "ddp", "tp", "tp"]
    assert all(r["wrong"] == 0 for r in rows)
    assert rows[0]["config"].endswith("(3 buckets)") and rows[1]["config"].endswith("(1 buckets)")
    for r in rows:
        eff = (r["t_comp_ms"] + r["t_comm_ms"] - r["t_both_ms"]) / min(r["t_comp_ms"], r["t_comm_ms"])
        assert r["efficiency"] == pytest.approx(eff)
        assert r["exposed_ms"] == pytest.approx(r["t_both_ms"] - r["t_comp_ms"])
    assert png.stat().st_size > 1000
