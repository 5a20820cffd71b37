"""Every blocking wait is bounded: settings, the wait itself, and peers that never arrive.

The MPI cases run tests/mpi/fault_worker.py under ``mpirun -n 4`` (or 3) with one rank that never
calls the collective: the others must fail within the timeout, through the validation exchange
(validate=True) or the ring itself (validate=False), instead of hanging.
"""
import time

import numpy as np
import pytest

from ringlab import faults
from ringlab.errors import (ABORT_EXIT_CODE, CollectiveTimeout, abort_on_timeout_enabled, default_timeout,
                                resolve_timeout)
from ringlab.transport import MpiTransport, wait_all

SUBPROCESS_S = 90


# ---- settings --------------------------------------------------------------------------------

def test_default_timeout_from_environment(monkeypatch):
    monkeypatch.delenv("RINGLAB_TIMEOUT", raising=False)
    assert default_timeout() == 300.0
    monkeypatch.setenv("RINGLAB_TIMEOUT", "2.5")
    assert default_timeout() == 2.5
    for off in ("0", "none", "inf"):
        monkeypatch.setenv("RINGLAB_TIMEOUT", off)
        assert default_timeout() is None
    # A value that could mean "no limit" by accident (-1, nan) is an error, not a silent hang (issue 15).
    for bad in ("soon", "-1", "nan", "-inf"):
        monkeypatch.setenv("RINGLAB_TIMEOUT", bad)
        with pytest.raises(ValueError, match="RINGLAB_TIMEOUT.*accepted"):
            default_timeout()


def test_timeout_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv("RINGLAB_TIMEOUT", "7")
    assert resolve_timeout(None) == 7.0
    assert resolve_timeout(1.5) == 1.5
    assert resolve_timeout(0) is None and resolve_timeout(float("inf")) is None
    from mpi4py import MPI
    assert MpiTransport(MPI.COMM_SELF).timeout == 7.0
    assert MpiTransport(MPI.COMM_SELF, timeout=2).timeout == 2.0
    assert MpiTransport(MPI.COMM_SELF, timeout=0).timeout is None   # 0 means no limit, never "fail at once"


def test_abort_switch(monkeypatch):
    monkeypatch.delenv("RINGLAB_ABORT_ON_TIMEOUT", raising=False)
    assert abort_on_timeout_enabled()
    monkeypatch.setenv("RINGLAB_ABORT_ON_TIMEOUT", "0")
    assert not abort_on_timeout_enabled()
    monkeypatch.setenv("RINGLAB_ABORT_ON_TIMEOUT", "maybe")
    with pytest.raises(ValueError, match="RINGLAB_ABORT_ON_TIMEOUT"):
        abort_on_timeout_enabled()


# ---- the bounded wait, in this process (a receive nobody will match) ---------------------------

def _unmatched_receive():
    from mpi4py import MPI
    buf = np.empty(4)
    return MPI.COMM_SELF.Irecv(buf, source=0, tag=991), buf


def _cancel(req):
    req.Cancel()
    req.Wait()


def test_wait_raises_within_the_timeout_naming_the_peer(monkeypatch):
    monkeypatch.setenv("RINGLAB_ABORT_ON_TIMEOUT", "0")
    req, _ = _unmatched_receive()
    t0 = time.monotonic()
    with pytest.raises(CollectiveTimeout, match="peer rank 5 did not send.*within 0.2 s") as info:
        wait_all([req], 0.2, lambda: ("rank 0: peer rank 5 did not send", 5))
    assert 0.2 <= time.monotonic() - t0 < 5
    assert info.value.peer == 5
    _cancel(req)


def test_timeout_handler_hook_runs_before_the_raise():
    seen = []
    previous = faults.set_timeout_handler(seen.append)
    req, _ = _unmatched_receive()
    try:
        with pytest.raises(CollectiveTimeout) as info:
            wait_all([req], 0.05, lambda: ("stuck", 1))
    finally:
        faults.set_timeout_handler(previous)
        _cancel(req)
    assert seen == [info.value]


# ---- peers that never arrive, under mpirun -------------------------------------------------------

@pytest.mark.parametrize("scenario,expected", [
    ("skip", "not every rank reached the argument check of allreduce"),
    ("skip-noval", "peer rank 2 did not send during ring reduce-scatter step 0"),
])
def test_rank_that_skips_the_collective_times_out_the_others(run_mpi, scenario, expected):
    t0 = time.monotonic()
    res = run_mpi(4, "tests/mpi/fault_worker.py", scenario, "--victim", "2", timeout=SUBPROCESS_S,
                  env={"RINGLAB_TIMEOUT": "3"}, check=False)
    assert time.monotonic() - t0 < 45
    assert res.returncode == ABORT_EXIT_CODE, res.stderr[-3000:]
    assert expected in res.stderr and "within 3 s" in res.stderr


def test_timeout_argument_bounds_validation_and_ring(run_mpi):
    """timeout= wins over a long $RINGLAB_TIMEOUT, in the validation exchange too (3 ranks)."""
    t0 = time.monotonic()
    res = run_mpi(3, "tests/mpi/fault_worker.py", "skip", "--victim", "1", "--timeout", "2",
                  timeout=SUBPROCESS_S, env={"RINGLAB_TIMEOUT": "600"}, check=False)
    assert time.monotonic() - t0 < 45
    assert res.returncode == ABORT_EXIT_CODE, res.stderr[-3000:]
    assert "not every rank reached the argument check" in res.stderr and "within 2 s" in res.stderr
