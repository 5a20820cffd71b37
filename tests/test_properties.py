"""Property tests (hypothesis): all-reduce = float64 reference within tolerance, ranks bitwise identical,
reduce-scatter + all-gather = all-reduce, for every registered algorithm, dtype, op and odd counts.

A handful of mpirun launches; inside each, tests/mpi/prop_allreduce.py runs hypothesis on rank 0 and
broadcasts each drawn case to the other ranks (its docstring documents the tolerances). Algorithms
are read from ringlab.api.ALLREDUCE_ALGORITHMS at run time, so new ones (FP8 included) are
covered without editing this file.
"""
import re

import pytest

from ringlab import settings

# (ranks, examples): small but covering N = 1, even, odd and counts not divisible by N.
FAST = [(1, 25), (2, 40), (3, 40), (4, 40), (5, 30)]
SLOW = [(8, 150), (4, 300)]


def _check(res, nprocs, examples):
    assert "PROPERTY FAILED" not in res.stdout, res.stdout[-6000:]
    m = re.search(r"properties: (\d+) cases on N=(\d+), failures=0", res.stdout)
    assert m and int(m.group(1)) >= examples and int(m.group(2)) == nprocs, res.stdout[-3000:]
    assert "algorithms=[" in res.stdout and "'ring'" in res.stdout


@pytest.mark.parametrize("nprocs,examples", FAST)
def test_allreduce_properties(run_mpi, nprocs, examples):
    res = run_mpi(nprocs, "tests/mpi/prop_allreduce.py", "--examples", examples, "--seed", 1000 + nprocs,
                  timeout=300, env={"RINGLAB_TIMEOUT": "60"})
    _check(res, nprocs, examples)


@pytest.mark.slow
@pytest.mark.skipif(not settings.get("RINGLAB_SLOW_TESTS"), reason="set RINGLAB_SLOW_TESTS=1 (minutes)")
@pytest.mark.parametrize("nprocs,examples", SLOW)
def test_allreduce_properties_many(run_mpi, nprocs, examples):
    res = run_mpi(nprocs, "tests/mpi/prop_allreduce.py", "--examples", examples, "--seed", 7 * nprocs,
                  timeout=900, env={"RINGLAB_TIMEOUT": "120"})
    _check(res, nprocs, examples)
