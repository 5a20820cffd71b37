"""Peak memory per rank of one collective, measured as RSS growth (tests/mpi/peak_memory.py, N = 8, 4, 2).

reduce_scatter reads its input and keeps two chunks (<= 1 + 2/N input sizes); every all-reduce out of
place, the FP8 ones included (their codec works in pieces), stays <= 2.2: input + output + a little scratch.
"""
import pytest

SLACK = 0.02


@pytest.mark.parametrize("N, MB", [(8, 16), (4, 32), (2, 32)])
def test_peak_rss_growth_per_collective(run_mpi, N, MB):
    res = run_mpi(N, "tests/mpi/peak_memory.py", "--mb", str(MB), timeout=240,
                  env={"MALLOC_MMAP_THRESHOLD_": "131072", "RINGLAB_RANKS_PER_NODE": "2"})
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("peak ")]
    peaks = {" ".join(r[1:-1]): float(r[-1]) for r in rows}
    assert peaks["reduce_scatter"] <= 1 + 2 / N + SLACK, peaks
    assert peaks["allreduce ring in place"] <= 1 + 1 / N + SLACK, peaks
    outofplace = {k: v for k, v in peaks.items() if k.startswith("allreduce ") and "in place" not in k}
    assert len(outofplace) >= 9 and {"allreduce fp8-ring", "allreduce fp8-direct"} <= set(outofplace), peaks
    assert all(v <= 2.2 for v in outofplace.values()), outofplace
