"""experiments/bandwidth_vs_n.py: a tiny real sweep over sub-communicators, and a refit of saved rows."""
import json
import os
import subprocess
import sys

import pytest

from ringlab.teach.alphabeta import load_fit, ring_allreduce_time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "bandwidth_vs_n.py")


def test_tiny_sweep_over_sub_communicators(run_mpi, tmp_path):
    # A job of 3 ranks sweeps N = 2 and 3; rank 2 waits at the barrier while N = 2 runs.
    out = tmp_path / "sweep.json"
    res = run_mpi(3, "experiments/bandwidth_vs_n.py", "-b", "100", "-e", "1600", "-f", "4", "--iters", "2",
                  "--warmup", "1", "--json", str(out), "--plot-prefix", str(tmp_path / "bw"), timeout=150)
    doc = json.loads(out.read_text())
    rows = doc["rows"]
    timed = [r for r in rows if r["variant"] in ("ring", "mpi-native")]
    # sizes 100, 400, 1600 bytes (not divisible by N = 3 in elements: 25, 100, 400)
    assert sorted({(r["nranks"], r["size"]) for r in timed}) == [(n, s) for n in (2, 3) for s in (100, 400, 1600)]
    assert len(timed) == 12 and all(r["wrong"] == 0 and r["time_us"] > 0 for r in timed)
    nccl = [r for r in rows if r["variant"] == "nccl"]
    assert len(nccl) == 6 and all(r["note"].startswith("n/a") for r in nccl)
    assert set(doc["meta"]["step_latency_s"]) == {"2", "3"}
    assert "allreduce, N = 2" in res.stdout and "allreduce, N = 3" in res.stdout
    assert "[  20/20 100%] N=3" in res.stderr  # progress: (3 sizes x 3 variants + 1 step) per N, n/a rows counted
    assert (tmp_path / "bw_vs_size.png").stat().st_size > 0 and (tmp_path / "bw_vs_n.png").stat().st_size > 0


def test_bad_nranks_is_a_clear_error(run_mpi):
    res = run_mpi(2, "experiments/bandwidth_vs_n.py", "--nranks", "2,5", "--iters", "1", timeout=60, check=False)
    assert res.returncode != 0 and "--nranks must lie in 2..2" in res.stdout + res.stderr


def test_refit_of_saved_sweep_writes_fit_json(tmp_path):
    rows = []
    for n in (2, 4, 8):
        for size in (1024, 65536, 1 << 22):
            t = float(ring_allreduce_time(size, n, 3e-6, 5e9))
            rows.append({"variant": "ring", "size": size, "count": size // 4, "nranks": n, "time_us": t * 1e6,
                         "busbw": 2 * (n - 1) / n * size / t / 1e9, "wrong": 0, "note": ""})
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps({"meta": {"host": "test", "backend": "numpy", "date": "now",
                                          "step_latency_s": {"2": 3.1e-6}}, "rows": rows}))
    fit_path = tmp_path / "fit.json"
    res = subprocess.run([sys.executable, SCRIPT, "--refit", str(sweep), "--fit", str(fit_path),
                          "--plot-prefix", str(tmp_path / "p")], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "alpha = 3.00 us per step, beta = 5.000 GB/s" in res.stdout
    fit = load_fit(fit_path, "ring")
    assert fit.alpha_s == pytest.approx(3e-6) and fit.beta_Bps == pytest.approx(5e9)
    assert fit.nranks == [2, 4, 8] and fit.step_latency_s == pytest.approx(3.1e-6) and fit.machine["host"] == "test"
    assert (tmp_path / "p_vs_size.png").exists()
    only = subprocess.run([sys.executable, SCRIPT, "--refit", str(sweep), "--fit-nranks", "2,8", "--fit", str(fit_path)],
                          capture_output=True, text=True, timeout=120)
    assert only.returncode == 0, only.stderr
    assert load_fit(fit_path, "ring").nranks == [2, 8] and "6 samples, N = [2, 8]" in only.stdout
