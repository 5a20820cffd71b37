"""Data-parallel inference: routing policies (pure) and a short real run over mpirun."""
import numpy as np
import pytest

from ringlab.teach import dp_inference as dpi


def test_round_robin_cycles():
    r = dpi.Router("round_robin", 3)
    assert [r.pick(1) for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_least_loaded_picks_fewest_outstanding_and_rotates_ties():
    r = dpi.Router("least_loaded", 3)
    r.assigned(0, 5)
    r.assigned(1, 1)
    assert r.pick(1) == 2
    r.assigned(2, 1)
    r.finished(0, 5, 0.1)
    assert r.pick(1) == 0
    ties = dpi.Router("least_loaded", 3)
    assert sorted(ties.pick(1) for _ in range(3)) == [0, 1, 2]


def test_response_time_aware_learns_a_slow_replica():
    r = dpi.Router("response_time_aware", 2)
    r.assigned(0, 1)
    r.finished(0, 1, 0.030)   # replica 0: 30 ms per unit
    r.assigned(1, 1)
    r.finished(1, 1, 0.010)   # replica 1: 10 ms per unit
    assert r.pick(4) == 1
    r.assigned(1, 9)          # replica 1 now has 9 units queued: (9+4)*10 ms > (0+4)*30 ms
    assert r.pick(4) == 0


def test_workload_and_errors():
    w = dpi.make_workload(1000, 100.0, seed=1)
    assert np.all(np.diff(w.arrivals) >= 0) and set(np.unique(w.sizes)) <= {1, 4, 32}
    assert abs(np.mean(w.sizes == 1) - 0.7) < 0.06
    with pytest.raises(ValueError, match="sum to 1"):
        dpi.make_workload(10, 1.0, mix=((1, 0.5), (2, 0.4)))
    with pytest.raises(ValueError, match="unknown routing policy"):
        dpi.Router("random", 2)
    s = dpi.summarize("x", np.array([0.01, np.nan, 0.03]), np.array([0, 1, 0]), 1.0, 2)
    assert s["completed"] == 2 and s["per_replica"] == [2, 1] and s["p50_ms"] == pytest.approx(20.0)


@pytest.mark.parametrize("nranks", [3, 4])
def test_experiment_serves_every_request_under_every_policy(run_mpi, nranks, tmp_path):
    out = tmp_path / "dpi.json"
    res = run_mpi(nranks, "experiments/dp_inference.py", "--requests", "40", "--deadline", "60", "--json", str(out),
                  timeout=180)
    import json
    data = json.loads(out.read_text())
    assert [r["policy"] for r in data["results"]] == list(dpi.POLICIES)
    for r in data["results"]:
        assert r["completed"] == 40 and sum(r["per_replica"]) == 40 and len(r["per_replica"]) == nranks - 1
        assert r["p99_ms"] >= r["p50_ms"] > 0 and r["throughput_rps"] > 0
    assert "response_time_aware" in res.stdout
