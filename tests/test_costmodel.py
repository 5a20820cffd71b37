"""The cost model reproduces the seeds' worked numbers and flags the ones that are wrong."""
import os
import subprocess
import sys

import pytest

from ringlab.teach.costmodel import (MODELS, Layout, Link, bubble_fraction, communication_cost,
                                   layer_forward_flops, pipeline_speedup, ring_allreduce_seconds, seed_claims,
                                   tp_allreduce_bytes)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPT3 = MODELS["gpt3-175b"]
SEED_NV, SEED_IB = Link("seed NVLink", 600e9), Link("seed IB", 25e9)


def test_one_tp_allreduce_of_gpt3_is_1_6_gb():
    assert tp_allreduce_bytes(GPT3) == 32 * 2048 * 12288 * 2 == 1_610_612_736


def test_seed_001_ring_times():
    assert ring_allreduce_seconds(1.6e9, 8, SEED_NV) == pytest.approx(4.67e-3, abs=0.005e-3)
    assert ring_allreduce_seconds(1.6e9, 8, SEED_IB) == pytest.approx(112e-3, rel=1e-9)
    for n, ms in ((2, 2.67), (4, 4.00), (8, 4.67), (16, 5.00)):
        assert ring_allreduce_seconds(1.6e9, n, SEED_NV) * 1e3 == pytest.approx(ms, abs=0.005)
    # The exact 1.61 GB gives 4.70 ms: the seed rounds the size, not the arithmetic.
    assert ring_allreduce_seconds(tp_allreduce_bytes(GPT3), 8, SEED_NV) * 1e3 == pytest.approx(4.698, abs=0.001)


def test_ring_latency_counts_2_n_minus_1_steps_and_one_rank_is_free():
    assert ring_allreduce_seconds(0, 8, Link("x", 1e9, 2e-6)) == pytest.approx(28e-6)
    assert ring_allreduce_seconds(1e9, 1, SEED_NV) == 0.0


def test_seed_000_volumes():
    assert 4 * GPT3.layers * tp_allreduce_bytes(GPT3) == 618_475_290_624        # "≈ 620 GB"
    assert GPT3.param_count * 2 == 350e9


def test_layer_flops_match_seed_001_compute_split():
    # 8-way TP at 312 TFLOPS: attention ~35 ms + FFN ~65 ms = ~100 ms per layer (seed 001 §4.1).
    assert layer_forward_flops(GPT3) / 8 / 312e12 == pytest.approx(0.0978, abs=0.0005)


def test_pipeline_speedup_and_bubble():
    assert pipeline_speedup(8, 32) == pytest.approx(8 * 32 / 39)
    assert pipeline_speedup(4, 1) == pytest.approx(1.0)          # one micro-batch: no overlap at all
    assert pipeline_speedup(1, 7) == 1.0
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)
    assert pipeline_speedup(16, 10 ** 9) == pytest.approx(16, rel=1e-6)


def test_training_layout_volumes_and_ccr():
    r = communication_cost(GPT3, Layout(dp=4, tp=8, pp=2, microbatches=8), SEED_NV, SEED_IB, SEED_IB, "training")
    mb = tp_allreduce_bytes(GPT3, 4)
    assert r.tp_allreduces_per_layer == 4 and r.tp_bytes_per_allreduce == mb
    assert r.tp_bytes_per_step == 96 * 4 * mb * 8 == 4 * 96 * tp_allreduce_bytes(GPT3)   # same 618.5 GB total
    assert r.tp_seconds_per_step == pytest.approx(48 * 4 * 8 * ring_allreduce_seconds(mb, 8, SEED_NV))
    assert r.pp_transfers_per_step == 1 * 8 * 2 and r.pp_bytes_per_transfer == mb
    assert r.dp_bytes_per_rank == pytest.approx(175e9 / 16 * 2)
    assert r.dp_seconds_per_step == pytest.approx(2 * 3 / 4 * 175e9 / 16 * 2 / 25e9)
    assert r.ccr == pytest.approx(r.compute_seconds_per_layer / r.tp_seconds_per_layer)
    assert r.pipeline_speedup == pytest.approx(2 / (1 + 1 / 8))


def test_inference_has_no_dp_traffic_and_half_the_tp():
    train = communication_cost(GPT3, Layout(dp=4, tp=8), SEED_NV, mode="training")
    infer = communication_cost(GPT3, Layout(dp=4, tp=8), SEED_NV, mode="inference")
    assert infer.dp_seconds_per_step == 0 and infer.dp_bytes_per_rank == 0
    assert infer.tp_bytes_per_step == train.tp_bytes_per_step / 2
    # CCR of 8-way TP on the seed's NVLink: ~10 (seed 001 §7.1's "27000" is wrong).
    assert infer.ccr == pytest.approx(10.4, abs=0.1)


@pytest.mark.parametrize("layout, match", [(Layout(tp=5), "divide the 96 attention heads"),
                                           (Layout(pp=5), "divide the 96 layers"),
                                           (Layout(microbatches=5), "divide the batch of 32"),
                                           (Layout(dp=0), "dp must be >= 1")])
def test_bad_layouts_are_rejected(layout, match):
    with pytest.raises(ValueError, match=match):
        communication_cost(GPT3, layout, SEED_NV)


def test_bad_mode_is_rejected():
    with pytest.raises(ValueError, match="mode must be"):
        communication_cost(GPT3, Layout(tp=8), SEED_NV, mode="serving")


def test_seed_claim_verdicts():
    claims = {c.claim: c for c in seed_claims()}
    ok = ["one TP all-reduce = 32*2048*12288*2 B", "ring all-reduce 1.6 GB, N=8, 600 GB/s",
          "ring all-reduce 1.6 GB, N=8, IB 25 GB/s", "TP training volume 384*32*2048*12288*2",
          "ring all-reduce 1.6 GB, N=16, 600 GB/s", "compute per layer (fwd, 8-way TP, 312 TFLOPS)"]
    for name in ok:
        assert claims[name].verdict.startswith("ok"), (name, claims[name])
    ccr = claims["CCR example ~= 27000"]
    assert ccr.verdict.startswith("WRONG") and ccr.computed == pytest.approx(10.4, abs=0.1)
    assert claims["latency term (N-1)*latency, N=8, 2 us"].verdict == "WRONG (1/2x)"
    assert claims["TP 620 GB / 600 GB/s ~= 1 s"].computed == pytest.approx(1.804, abs=0.001)
    assert claims["DP 350 GB / 25 GB/s = 14 s"].computed == pytest.approx(24.5)
    assert claims["16 GPUs over IB: speedup 100/(100/16+50) = 1.78x"].verdict == "inconsistent"
    assert all(c.verdict for c in claims.values())


def test_experiment_prints_seed_table_and_a_layout():
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "cost_model.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=60)
    seeds = run("--seeds")
    assert seeds.returncode == 0 and "CCR example ~= 27000" in seeds.stdout and "WRONG" in seeds.stdout
    lay = run("--tp", "8", "--pp", "2", "--dp", "4", "--microbatches", "8", "--tp-link", "300@2us")
    assert lay.returncode == 0 and "== training" in lay.stdout and "pipeline: speedup" in lay.stdout
    bad = run("--tp", "7")
    assert bad.returncode == 2 and "TP = 7 must divide" in bad.stderr
    assert run("--tp-link", "warp-drive").returncode != 0
