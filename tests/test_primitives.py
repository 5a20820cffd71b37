"""The ring over NCCL-style primitives (primitives.py): structure, schedule agreement, a pull execution."""
import numpy as np
import pytest

from ringlab.primitives import (ring_allgather_program, ring_allreduce_program, ring_reduce_scatter_program,
                                program_steps)
from ringlab.schedule import (chunk_bounds, reduce_scatter_owner, ring_allgather_schedule,
                              ring_reduce_scatter_schedule)


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
def test_allreduce_is_nccl_run_ring(n):
    for r in range(n):
        kinds = [p.kind for p in ring_allreduce_program(r, n)]
        assert kinds == (["send"] + ["recv_reduce_send"] * (n - 2) + ["recv_reduce_copy_send"]
                         + ["recv_copy_send"] * (n - 2) + ["recv"])


def test_one_rank_has_no_primitives():
    assert ring_allreduce_program(0, 1) == [] == ring_reduce_scatter_program(0, 1) == ring_allgather_program(0, 1)


@pytest.mark.parametrize("n", [2, 3, 4, 7])
def test_primitives_pair_the_schedule_steps(n):
    for r in range(n):
        steps = ring_reduce_scatter_schedule(r, n) + ring_allgather_schedule(r, n)
        prog = ring_allreduce_program(r, n)
        assert [p.send for p in prog[:-1]] == steps and [p.recv for p in prog[1:]] == steps
        assert all(out.send is into.recv for out, into in program_steps(prog))    # one sendrecv per step
        final = [p for p in prog if p.final]
        assert len(final) == 1 and final[0].chunk == reduce_scatter_owner(r, n)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_reduce_scatter_and_allgather_programs(n):
    for r in range(n):
        rs = ring_reduce_scatter_program(r, n, rotate=-1)
        assert [p.kind for p in rs] == ["send"] + ["recv_reduce_send"] * (n - 2) + ["recv_reduce_copy"]
        assert rs[-1].chunk == reduce_scatter_owner(r, n, -1) == r
        ag = ring_allgather_program(r, n)
        assert [p.kind for p in ag] == ["send"] + ["recv_copy_send"] * (n - 2) + ["recv"]


def _pull_execute(inputs, order):
    """Run every rank's program with pull semantics (read the left's src or out), primitives interleaved
    in ``order``; a read of a chunk the left has overwritten since it sent it is a detected race."""
    n, count = len(inputs), inputs[0].size
    bounds = chunk_bounds(count, n)
    progs = [ring_allreduce_program(r, n) for r in range(n)]
    outs = [np.full(count, np.nan) for _ in range(n)]
    done = [1] * n                                   # primitive 0 (send) is complete at the start
    version = [dict() for _ in range(n)]             # chunk -> primitive that last wrote it
    while any(d < len(p) for d, p in zip(done, progs)):
        progressed = False
        for r in order(n):
            i, left, right = done[r], (r - 1) % n, (r + 1) % n
            if i >= len(progs[r]) or done[left] < i:         # wait: the left finished primitive i-1
                continue
            prim = progs[r][i]
            if prim.reread is not None and done[right] < prim.reread + 2:
                continue                                      # wait: the right read what we overwrite
            lo, hi = bounds[prim.chunk]
            peer = inputs[left] if i == 1 else outs[left]
            assert i == 1 or version[left].get(prim.chunk) == i - 1, "read a chunk overwritten after it was sent"
            outs[r][lo:hi] = inputs[r][lo:hi] + peer[lo:hi] if prim.reduce else peer[lo:hi]
            version[r][prim.chunk] = i
            done[r] += 1
            progressed = True
        assert progressed, "deadlock"
    return outs


@pytest.mark.parametrize("n", [2, 3, 4, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pull_execution_in_any_order_is_correct_and_race_free(n, seed):
    rng = np.random.default_rng(seed)
    inputs = [rng.integers(0, 100, 11).astype(np.float64) for _ in range(n)]
    orders = [lambda k: range(k), lambda k: reversed(range(k)), lambda k: rng.permutation(k)]
    outs = _pull_execute(inputs, orders[seed])
    want = np.sum(inputs, axis=0)
    for out in outs:
        assert np.array_equal(out, want)
