"""algo="auto": cost models, the alpha-beta fit, the choice, the tuning file, and rank agreement."""
import json
import math

import pytest

from ringlab.bench.tuner import (DEFAULT_FITS, choose_algorithm, cost_coefficients, fit_alpha_beta, load_tuning,
                               predict_us, write_tuning)


def test_cost_coefficients_match_the_seed_formulas():
    assert cost_coefficients("ring", 8) == (14, 14 / 8)
    assert cost_coefficients("recursive_doubling", 8) == (3, 3)
    assert cost_coefficients("rabenseifner", 8) == (6, 2 * 7 / 8)
    # N = 6: p = 4 plus fold and unfold steps of S bytes each
    assert cost_coefficients("recursive_doubling", 6) == (4, 4)
    assert cost_coefficients("rabenseifner", 6) == (6, 1.5 + 2)
    assert cost_coefficients("direct", 8) == (1, 7)
    assert cost_coefficients("ring", 1) == (0, 0)
    with pytest.raises(ValueError, match="no cost model"):
        cost_coefficients("bogus", 4)


@pytest.mark.parametrize("algo", ["ring", "recursive_doubling", "rabenseifner", "ring_bidir", "direct"])
def test_fit_recovers_alpha_beta_from_model_times(algo):
    true = {"alpha_us": 12.5, "beta_GBps": 3.0}
    sizes = [8, 1024, 65536, 1 << 20, 1 << 23]
    times = [predict_us(algo, s, 8, true) for s in sizes]
    fit = fit_alpha_beta(algo, 8, sizes, times)
    assert fit["alpha_us"] == pytest.approx(12.5, rel=1e-6)
    assert fit["beta_GBps"] == pytest.approx(3.0, rel=1e-6)


def test_fit_clamps_negative_alpha():
    fit = fit_alpha_beta("ring", 4, [1 << 20, 1 << 22], [100.0, 400.0])   # pure bandwidth: alpha = 0
    assert fit["alpha_us"] >= 0 and math.isfinite(fit["beta_GBps"]) and fit["beta_GBps"] > 0


def test_choice_latency_then_bandwidth_with_defaults():
    small, _, source = choose_algorithm(8, 8, None)
    large, pred, _ = choose_algorithm(64 << 20, 8, None)
    assert source == "built-in defaults"
    assert small == "recursive_doubling"
    assert large in ("ring", "rabenseifner") and pred[large] == min(pred.values())
    assert "ring_bidir" not in pred and "direct" not in pred   # only a measured fit may pick them
    assert set(pred) == set(DEFAULT_FITS)


def test_choice_uses_tuned_fits_and_nearest_n(tmp_path):
    path = tmp_path / "tuning.json"
    fits = {"ring": {"alpha_us": 1.0, "beta_GBps": 100.0}, "recursive_doubling": {"alpha_us": 1000.0, "beta_GBps": 1.0}}
    write_tuning(str(path), 4, fits, {"host": "test"})
    table = load_tuning(str(path))
    assert json.loads(path.read_text())["fits"]["4"]["ring"]["alpha_us"] == 1.0
    name, _, source = choose_algorithm(8, 4, table)
    assert name == "ring" and source == "tuned at N=4"
    assert choose_algorithm(8, 8, table)[2] == "tuned at N=4"      # nearest measured N
    assert choose_algorithm(8, 4, table, available={"recursive_doubling"})[0] == "recursive_doubling"
    write_tuning(str(path), 8, fits, {})                            # merge keeps N=4
    assert set(load_tuning(str(path))["fits"]) == {"4", "8"}


def test_unreadable_tuning_file_is_ignored_with_a_warning(tmp_path):
    bad = tmp_path / "t.json"
    bad.write_text("{not json")
    with pytest.warns(UserWarning, match="unreadable"):
        assert load_tuning(str(bad)) is None
    assert load_tuning(str(tmp_path / "missing.json")) is None


def test_tuner_command_writes_a_file_and_auto_agrees(run_mpi, tmp_path):
    path = tmp_path / "tuning.json"
    res = run_mpi(3, "experiments/tune.py", "--sizes", "8,64K", "--iters", "2", "--warmup", "1", "--out", str(path),
                  timeout=180)
    assert "alpha-beta fits at N = 3" in res.stdout, res.stdout
    table = json.loads(path.read_text())
    fits = table["fits"]["3"]
    assert set(fits) == {"ring", "recursive_doubling", "rabenseifner", "ring_bidir", "direct"}
    assert all(f["alpha_us"] >= 0 and len(f["points"]) == 2 for f in fits.values())
    res = run_mpi(3, "tests/mpi/alg_errors.py", "auto_agrees", timeout=120, env={"RINGLAB_TUNING": str(path)})
    assert "auto picks:" in res.stdout and "no tuning file" not in res.stderr


def test_auto_without_file_says_so(run_mpi, tmp_path):
    res = run_mpi(4, "tests/mpi/alg_errors.py", "auto_agrees", timeout=120,
                  env={"RINGLAB_TUNING": str(tmp_path / "missing.json")})
    assert "no tuning file" in res.stderr and "built-in alpha-beta defaults" in res.stderr
    assert res.stdout.split("auto picks:")[1].split()[0] == "recursive_doubling"
