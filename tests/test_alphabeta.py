"""α-β model: the fit recovers known parameters, stays non-negative, and its JSON round-trips."""
import json
import math

import numpy as np
import pytest

from ringlab.teach.alphabeta import (SCHEMA, fit_alpha_beta, format_fit_report, load_fit, ring_allreduce_time,
                                   samples_from_rows, seed_allreduce_time, write_fits)

ALPHA, BETA = 5e-6, 20e9


def synthetic(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for n in (2, 3, 5, 8):
        for size in (1 << 10, 1 << 14, 1 << 18, 1 << 22, 1 << 26):
            t = float(ring_allreduce_time(size, n, ALPHA, BETA))
            out.append((size, n, t * (1 + noise * rng.standard_normal())))
    return out


def test_model_counts_2_n_minus_1_steps_and_seed_counts_n_minus_1():
    # Zero-byte message: only start-ups remain. The ring pays 2(N-1) of them, the seed's formula N-1.
    assert ring_allreduce_time(0, 8, 1e-6, 1e9) == pytest.approx(14e-6)
    assert seed_allreduce_time(0, 8, 1e-6, 1e9) == pytest.approx(7e-6)
    # Bandwidth terms agree: 2(N-1)/N * S / B.
    assert ring_allreduce_time(1.6e9, 8, 0, 600e9) == pytest.approx(seed_allreduce_time(1.6e9, 8, 0, 600e9))
    assert ring_allreduce_time(1.6e9, 8, 0, 600e9) == pytest.approx(4.6667e-3, rel=1e-4)


@pytest.mark.parametrize("weighting", ["relative", "absolute"])
def test_fit_recovers_exact_parameters(weighting):
    fit = fit_alpha_beta(synthetic(), weighting=weighting)
    assert fit.alpha_s == pytest.approx(ALPHA, rel=1e-9)
    assert fit.beta_Bps == pytest.approx(BETA, rel=1e-9)
    assert fit.rel_rms_error < 1e-9 and fit.max_rel_error < 1e-9
    assert fit.nranks == [2, 3, 5, 8] and fit.n_samples == 20
    assert fit.seed_form_latency_s == pytest.approx(2 * ALPHA)


def test_fit_tolerates_noise():
    fit = fit_alpha_beta(synthetic(noise=0.05, seed=3))
    assert fit.alpha_s == pytest.approx(ALPHA, rel=0.15)
    assert fit.beta_Bps == pytest.approx(BETA, rel=0.15)
    assert 0.01 < fit.rel_rms_error < 0.15


def test_seed_form_fits_same_data_with_twice_the_latency():
    # The two forms are the same straight line in (N-1): fitting (N-1)*lam returns lam = 2*alpha.
    samples = synthetic()
    fit = fit_alpha_beta(samples)
    for size, n, t in samples:
        assert seed_allreduce_time(size, n, fit.seed_form_latency_s, fit.beta_Bps) == pytest.approx(t, rel=1e-9)


def test_fit_keeps_alpha_non_negative():
    # Pure bandwidth data with a little negative bias at small sizes would give alpha < 0 unconstrained.
    samples = [(s, n, float(ring_allreduce_time(s, n, 0, 1e9)) * (0.9 if s < 5000 else 1.0))
               for n in (2, 4) for s in (1024, 4096, 1 << 20)]
    fit = fit_alpha_beta(samples)
    assert fit.alpha_s == 0.0 and fit.beta_Bps > 0


def test_fit_rejects_unusable_samples():
    with pytest.raises(ValueError, match="at least 2"):
        fit_alpha_beta([(1024, 4, 1e-3)])
    with pytest.raises(ValueError, match="at least 2"):
        fit_alpha_beta([(1024, 1, 1e-3), (2048, 1, 2e-3)])   # N = 1 has no communication
    with pytest.raises(ValueError, match="cannot separate"):
        fit_alpha_beta([(1024, 4, 1e-3), (1024, 4, 1.1e-3)])
    with pytest.raises(ValueError, match="no bandwidth term"):
        fit_alpha_beta([(1024, 2, 2e-3), (1 << 20, 2, 1e-3), (1024, 4, 6e-3), (1 << 20, 4, 3e-3)])
    with pytest.raises(ValueError, match="weighting"):
        fit_alpha_beta(synthetic(), weighting="huber")


def test_samples_from_rows_skips_na_wrong_and_other_variants():
    rows = [{"variant": "ring", "size": 1024, "nranks": 4, "time_us": 100.0, "wrong": 0},
            {"variant": "ring", "size": 2048, "nranks": 4, "time_us": 150.0, "wrong": 3},
            {"variant": "ring", "size": 4096, "nranks": 4, "time_us": math.nan, "wrong": -1},
            {"variant": "mpi-native", "size": 1024, "nranks": 4, "time_us": 90.0, "wrong": 0},
            {"variant": "ring", "size": 0, "nranks": 4, "time_us": 10.0, "wrong": 0}]
    assert samples_from_rows(rows, "ring") == [(1024, 4, pytest.approx(1e-4))]


def test_report_shows_model_and_seed_beside_measurement():
    samples = synthetic()
    fit = fit_alpha_beta(samples)
    fit.algo = "ring"
    text = format_fit_report(fit, samples)
    assert "alpha = 5.00 us per step, beta = 20.000 GB/s" in text
    assert "2*alpha" in text and "N-1 reduce-scatter + N-1 all-gather" in text
    # At N = 8 and 1 KiB the seed form with latency = alpha misses 7 of the 14 start-ups: about -50%.
    line = next(l for l in text.splitlines() if l.split()[:2] == ["8", "1024"])
    assert float(line.split()[4]) == pytest.approx(0.0, abs=0.1)
    assert float(line.split()[6]) == pytest.approx(-49.5, abs=1.0)


def test_fit_json_round_trip(tmp_path):
    fit = fit_alpha_beta(synthetic())
    fit.algo, fit.machine, fit.step_latency_s = "ring", {"host": "h", "backend": "numpy"}, 4.5e-6
    path = tmp_path / "fit.json"
    write_fits(path, [fit], {"date": "d"})
    doc = json.loads(path.read_text())
    assert doc["schema"] == SCHEMA and doc["fits"][0]["algo"] == "ring"
    assert {"alpha_s", "beta_Bps", "nranks", "machine"} <= set(doc["fits"][0])
    back = load_fit(path, "ring")
    assert back.alpha_s == fit.alpha_s and back.beta_Bps == fit.beta_Bps and back.machine["host"] == "h"
    assert back.predict(1 << 20, 4) == pytest.approx(fit.predict(1 << 20, 4))
    with pytest.raises(KeyError, match="no fit for algo 'nccl'"):
        load_fit(path, "nccl")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "other", "fits": []}))
    with pytest.raises(ValueError, match="not a ringlab.alphabeta/1 file"):
        load_fit(bad)
