"""The pure ring schedule: chunking, step tables, and the ownership invariant (no MPI)."""
import pytest

from ringlab.schedule import (chunk_bounds, reduce_scatter_owner, ring_allgather_schedule,
                                  ring_allreduce_schedule, ring_reduce_scatter_schedule)


@pytest.mark.parametrize("count", [0, 1, 2, 3, 7, 8, 9, 100, 100003])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 16])
def test_chunk_bounds_cover_count_and_spread_remainder(count, n):
    b = chunk_bounds(count, n)
    assert len(b) == n
    assert b[0][0] == 0 and b[-1][1] == count
    assert all(b[i][1] == b[i + 1][0] for i in range(n - 1))
    sizes = [hi - lo for lo, hi in b]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # remainder on the first chunks


def test_chunk_bounds_rejects_bad_arguments():
    with pytest.raises(ValueError):
        chunk_bounds(10, 0)
    with pytest.raises(ValueError):
        chunk_bounds(-1, 4)


def test_seed_004_table_for_four_ranks():
    # Seed 004: a sends a0, then a3+d3, then a2+c2+d2; receives d3, c2+d2, b1+c1+d1.
    a = ring_reduce_scatter_schedule(0, 4)
    assert [s.send_chunk for s in a] == [0, 3, 2]
    assert [s.recv_chunk for s in a] == [3, 2, 1]
    assert all(s.send_to == 1 and s.recv_from == 3 for s in a)
    ag = ring_allgather_schedule(0, 4)
    assert [s.send_chunk for s in ag] == [1, 0, 3]
    assert [s.recv_chunk for s in ag] == [0, 3, 2]


def simulate(n, rotate=0):
    """Run the schedules on sets of contributors: holds[r][c] = ranks whose addend chunk c holds."""
    holds = [[{r} for _ in range(n)] for r in range(n)]
    for s in range(n - 1):
        steps = [ring_reduce_scatter_schedule(r, n, rotate)[s] for r in range(n)]
        sent = {r: (st.send_chunk, set(holds[r][st.send_chunk])) for r, st in enumerate(steps)}
        for r, st in enumerate(steps):
            chunk, payload = sent[st.recv_from]
            assert chunk == st.recv_chunk, "receiver expects the chunk its left neighbour sends"
            assert not (holds[r][chunk] & payload), "an addend would be counted twice"
            holds[r][chunk] |= payload
    owners = {}
    for r in range(n):
        full = [c for c in range(n) if holds[r][c] == set(range(n))]
        owners[r] = full
    for s in range(n - 1):
        steps = [ring_allgather_schedule(r, n, rotate)[s] for r in range(n)]
        sent = {r: (st.send_chunk, set(holds[r][st.send_chunk])) for r, st in enumerate(steps)}
        for r, st in enumerate(steps):
            chunk, payload = sent[st.recv_from]
            assert chunk == st.recv_chunk
            assert payload == set(range(n)), "all-gather only forwards fully reduced chunks"
            holds[r][chunk] = payload
    return owners, holds


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 16])
@pytest.mark.parametrize("rotate", [0, -1])
def test_reduce_scatter_ownership_and_allgather_completion(n, rotate):
    owners, holds = simulate(n, rotate)
    for r in range(n):
        assert owners[r] == [reduce_scatter_owner(r, n, rotate)]
        assert all(h == set(range(n)) for h in holds[r])
    assert sorted(reduce_scatter_owner(r, n, rotate) for r in range(n)) == list(range(n))


def test_rotate_minus_one_gives_rank_its_own_chunk():
    assert all(reduce_scatter_owner(r, 6, rotate=-1) == r for r in range(6))


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_allreduce_has_2_n_minus_1_steps_and_traffic_2_n_minus_1_over_n(n):
    steps = ring_allreduce_schedule(0, n)
    assert len(steps) == 2 * (n - 1)
    count = 1000 * n
    b = chunk_bounds(count, n)
    sent = sum(b[st.send_chunk][1] - b[st.send_chunk][0] for st in steps)
    assert sent == 2 * (n - 1) * count // n
