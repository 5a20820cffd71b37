"""3D parallelism: rank mapping, sharding maths, and the full TP/SP/PP/DP check on real mpirun."""
import numpy as np
import pytest
from mpi4py import MPI

from ringlab.teach import parallel3d as p3d


def test_coordinates_and_members_follow_seed_003():
    g = p3d.ParallelGroups(8, 8, 8, 0, 0, 0, None, None, None)
    assert p3d.coordinates(0, 8, 8) == (0, 0, 0)
    assert p3d.coordinates(77, 8, 8) == (77 % 8, (77 // 8) % 8, 77 // 64)
    tp, pp, dp = g.members(0)
    assert tp == list(range(8)) and pp == [0, 8, 16, 24, 32, 40, 48, 56]
    assert dp == [0, 64, 128, 192, 256, 320, 384, 448]
    tp, pp, dp = g.members(77)
    assert 77 in tp and 77 in pp and 77 in dp and len(set(tp) & set(pp) & set(dp)) == 1


def test_shards_reassemble_and_single_rank_tp_equals_reference():
    rng = np.random.default_rng(3)
    w = p3d.init_layer(rng, 12, 3, 24)
    parts = [p3d.shard_layer(w, 3, r) for r in range(3)]
    assert np.array_equal(np.concatenate([s["w1"] for s in parts], axis=1), w["w1"])
    assert np.array_equal(np.concatenate([s["wo"] for s in parts], axis=0), w["wo"])
    x = rng.standard_normal((2, 5, 12))
    # the row-parallel partial sums add up to the full layer's sub-blocks
    partial = sum(p3d._attention_core(x, s["wq"], s["wk"], s["wv"], s["heads"]) @ s["wo"] for s in parts)
    np.testing.assert_allclose(partial, p3d.attention_reference(x, w), rtol=1e-12, atol=1e-12)
    y = p3d.tp_layer(x, p3d.shard_layer(w, 1, 0), MPI.COMM_SELF)
    np.testing.assert_allclose(y, p3d.layer_reference(x, w), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="heads do not split"):
        p3d.shard_layer(w, 2, 0)


def test_grads_reference_matches_finite_differences():
    rng = np.random.default_rng(4)
    w = p3d.init_layer(rng, 6, 2, 8)
    x = rng.standard_normal((2, 3, 6))
    dw1, _ = p3d.mlp_grads_reference(x, w)
    loss = lambda: 0.5 * np.sum(p3d.mlp_reference(x, w) ** 2) / 6   # noqa: E731
    eps, (i, j) = 1e-6, (1, 5)
    w["w1"][i, j] += eps
    up = loss()
    w["w1"][i, j] -= 2 * eps
    down = loss()
    assert dw1[i, j] == pytest.approx((up - down) / (2 * eps), rel=1e-6)


@pytest.mark.parametrize("nranks,args", [
    (8, []),                                                                    # TP = PP = DP = 2
    (8, ["--tp", "4", "--pp", "2", "--dtype", "float32", "--microbatches", "3"]),
    (3, ["--tp", "3", "--pp", "1", "--hidden", "12", "--heads", "3", "--ffn", "24", "--seq", "6"]),
    (4, ["--tp", "1", "--pp", "4", "--layers-per-stage", "2"]),
])
def test_parallel3d_experiment_checks_pass(run_mpi, nranks, args):
    res = run_mpi(nranks, "experiments/parallel3d.py", *args, timeout=180)
    assert res.stdout.count("PASS") >= 3 and "FAIL" not in res.stdout, res.stdout
    assert "rank  tp  pp  dp" in res.stdout


def test_bad_split_is_a_clear_error(run_mpi):
    res = run_mpi(8, "experiments/parallel3d.py", "--tp", "3", timeout=60, check=False)
    assert res.returncode != 0
    assert "must be a multiple of TP * PP = 6" in res.stderr
