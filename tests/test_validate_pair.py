"""Two ranks agree over one persistent Irecv/Isend pair (validate._Pair) instead of an Iallgather.

The same guarantees as on 3 and 4 ranks (tests/test_validate.py): every field mismatch and every
one-rank rejection raises the same InvalidCollectiveCall on both ranks, the next call is exact, a rank
that skips the call times the other out in the argument check, and no persistent request is left at exit.
"""
import time

import numpy as np
from mpi4py import MPI

from ringlab import validate
from ringlab.errors import ABORT_EXIT_CODE


def _no_leftover_requests(res):
    assert "persistent request" not in res.stderr, res.stderr[-2000:]


def test_every_field_mismatch_on_two_ranks(run_mpi):
    res = run_mpi(2, "tests/mpi/validate_fields.py", timeout=120, env={"RINGLAB_TIMEOUT": "30"})
    assert "validate cases ok: 13 on 2 ranks" in res.stdout
    _no_leftover_requests(res)


def test_one_rank_rejects_on_two_ranks(run_mpi):
    res = run_mpi(2, "tests/mpi/one_rank_rejects.py", timeout=150, env={"RINGLAB_TIMEOUT": "60"})
    assert "one-rank cases ok: 12 on 2 ranks" in res.stdout
    res = run_mpi(2, "tests/mpi/one_rank_rejects.py", "--same", timeout=120)
    assert "same-call cases ok: 4 on 2 ranks" in res.stdout
    _no_leftover_requests(res)


def test_a_rank_that_skips_the_call_times_out_the_other_in_the_argument_check(run_mpi):
    t0 = time.monotonic()
    res = run_mpi(2, "tests/mpi/fault_worker.py", "skip", "--victim", "1", timeout=120,
                  env={"RINGLAB_TIMEOUT": "3"}, check=False)
    assert time.monotonic() - t0 < 45
    assert res.returncode == ABORT_EXIT_CODE, res.stderr[-3000:]
    assert "not every rank reached the argument check of allreduce" in res.stderr and "within 3 s" in res.stderr


def test_the_two_rank_fingerprint_is_the_exchanged_one():
    """The bytes _agree writes into the pair's buffer are _fingerprint's, with the call number and the flag."""
    sig = ("allreduce", 16384, "float32", "sum", "ring", False)
    row = np.frombuffer(validate._prefix(sig, "MainThread") + validate._pack_tail(7, True), dtype=np.int64)
    expected = validate._fingerprint(sig, "MainThread")
    expected[-2:] = 7, 1
    assert row.tobytes() == expected.tobytes() and row.size == validate._EXCHANGED
    assert validate.AGREE_TAG <= 32767    # MPI guarantees tags up to 32767 (MPI_TAG_UB may be no larger)
    assert MPI.COMM_SELF.Get_attr(MPI.TAG_UB) >= validate.AGREE_TAG
