"""Beyond-ring all-reduce algorithms over real mpirun: float64 reference, every op, odd counts, N = 1..8."""
import pytest

ALGOS = "ring,recursive_doubling,rabenseifner,ring_bidir,direct,hierarchical,auto"


@pytest.mark.parametrize("nranks,dtypes", [(1, "float32,int64"), (2, "float32,int64"), (3, "float64,int64"),
                                           (4, "float32"), (5, "float32,int64"), (6, "float64"), (7, "float32"),
                                           (8, "float32,float64,int64")])
def test_every_algorithm_matches_reference_and_ranks_agree(run_mpi, nranks, dtypes, tmp_path):
    res = run_mpi(nranks, "tests/mpi/alg_check.py", ALGOS, dtypes, timeout=240,
                  env={"RINGLAB_TUNING": str(tmp_path / "none.json")})
    assert f"N={nranks}:" in res.stdout and "OK" in res.stdout, res.stdout


@pytest.mark.parametrize("nranks", [3])
def test_half_precision(run_mpi, nranks):
    res = run_mpi(nranks, "tests/mpi/alg_check.py", "recursive_doubling,rabenseifner,ring_bidir,direct",
                  "float16,bfloat16", timeout=180)
    assert "OK" in res.stdout, res.stdout


@pytest.mark.parametrize("nranks,ranks_per_node", [(8, 2), (8, 4), (6, 3), (3, 1)])
def test_hierarchical_with_declared_nodes(run_mpi, nranks, ranks_per_node):
    res = run_mpi(nranks, "tests/mpi/alg_check.py", "hierarchical,hierarchical_rd", "float32", timeout=180,
                  env={"RINGLAB_RANKS_PER_NODE": str(ranks_per_node)})
    assert "OK" in res.stdout, res.stdout


def test_hierarchical_indivisible_raises_on_every_rank(run_mpi):
    res = run_mpi(5, "tests/mpi/alg_errors.py", "indivisible", timeout=60, env={"RINGLAB_RANKS_PER_NODE": "2"})
    assert res.stdout.count("raised:") == 5, res.stdout
    assert "N = 5 ranks is not divisible by ranks_per_node = 2" in res.stdout


def test_hierarchical_bad_env_is_a_clear_error(run_mpi):
    res = run_mpi(2, "tests/mpi/alg_errors.py", "indivisible", timeout=60, env={"RINGLAB_RANKS_PER_NODE": "x"},
                  check=False)
    assert res.returncode != 0
    assert "not an integer" in res.stderr + res.stdout
