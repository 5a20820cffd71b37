"""Async collectives: Work semantics in-process, and real mpirun runs for results, isolation,
errors, timeouts, progress during compute, and the MPI thread-level check."""
import threading

import pytest

from ringlab import CollectiveTimeout, Work, allreduce_async  # noqa: F401  (exported API)

BLAS1 = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}


def _finish_later(work, delay, **kw):
    t = threading.Timer(delay, lambda: work._finish(**kw))
    t.start()
    return t


def test_work_wait_timeout_then_result():
    w = Work("allreduce", 0)
    assert not w.test() and not w.done
    with pytest.raises(CollectiveTimeout, match="not done within 0.05 s"):
        w.wait(timeout=0.05)
    _finish_later(w, 0.05, result="sum").join()
    assert w.done and w.test()
    assert w.wait(timeout=1) == "sum"
    assert w.finished_at is not None


def test_work_reraises_background_error_at_wait():
    w = Work("reduce_scatter", 1)
    w._finish(error=ValueError("boom on rank 3"))
    assert w.test()  # finished (unsuccessfully): test() never raises
    with pytest.raises(ValueError, match="boom on rank 3"):
        w.wait()
    assert "failed" in repr(w)


@pytest.mark.parametrize("nprocs", [1, 3, 4])
def test_async_collectives_match_reference(run_mpi, nprocs):
    res = run_mpi(nprocs, "tests/mpi/async_collectives.py", timeout=180, env=BLAS1)
    assert res.stdout.count("async collectives OK") == nprocs


def test_async_progress_while_caller_computes(run_mpi):
    res = run_mpi(4, "tests/mpi/async_progress.py", 1 << 18, 0.5, timeout=180, env=BLAS1)
    assert "progress during compute OK on all 4 ranks" in res.stdout


def test_async_refuses_without_thread_multiple(run_mpi):
    res = run_mpi(2, "tests/mpi/async_thread_level.py", timeout=60)
    assert res.stdout.count("refused") == 2 and "MPI_THREAD_MULTIPLE" in res.stdout


def test_two_threads_issuing_on_one_communicator_never_get_a_wrong_sum(run_mpi):
    """Calls that pair across threads raise on every rank; one communicator per thread is all right."""
    res = run_mpi(2, "tests/mpi/async_threads.py", timeout=240, env=BLAS1)
    line = next(l for l in res.stdout.splitlines() if l.startswith("threads:"))
    assert line.endswith("0 wrong (of 200)"), res.stdout
    assert "own comms: 200 right, 0 errors, 0 wrong (of 200)" in res.stdout
