"""Ranks agree on (collective, count, dtype, op, algo, in-place) before a collective, or all raise.

tests/mpi/validate_fields.py makes each field disagree on one rank (the odd rank moves with the case)
under mpirun -n 3 and -n 4: every rank must raise the same InvalidCollectiveCall naming the odd rank
and its value, nobody may hang, and a correct all-reduce right after must be exact.
"""
import numpy as np
import pytest

from ringlab.validate import FIELDS, InvalidCollectiveCall, _describe, checked_call, validation_enabled

N_CASES = 13


@pytest.mark.parametrize("nprocs", [3, 4])
def test_every_field_mismatch_raises_the_same_error_on_every_rank(run_mpi, nprocs):
    res = run_mpi(nprocs, "tests/mpi/validate_fields.py", timeout=120, env={"RINGLAB_TIMEOUT": "30"})
    assert f"validate cases ok: {N_CASES} on {nprocs} ranks" in res.stdout
    # The one-bad-dtype case from the issue: rank 2 passes complex64, everyone hears about it.
    assert "rank 2: TypeError: unsupported dtype complex64" in res.stdout


def test_validation_off_skips_the_exchange(run_mpi):
    res = run_mpi(4, "tests/mpi/validate_fields.py", "--off", timeout=120, env={"RINGLAB_VALIDATE": "0"})
    assert "validation off ok" in res.stdout


def test_validate_env_switch(monkeypatch):
    monkeypatch.delenv("RINGLAB_VALIDATE", raising=False)
    assert validation_enabled()
    for off in ("0", "false", "off"):
        monkeypatch.setenv("RINGLAB_VALIDATE", off)
        assert not validation_enabled()
    monkeypatch.setenv("RINGLAB_VALIDATE", "sometimes")
    with pytest.raises(ValueError, match="RINGLAB_VALIDATE"):
        validation_enabled()


def test_describe_names_ranks_and_values():
    rows = [("'allreduce'", "8", "'float32'", "'sum'", "'ring'", "False")] * 3
    rows[1] = rows[1][:2] + ("'float16'",) + rows[1][3:]
    parts = _describe(rows, [None, None, "TypeError: boom"])
    assert parts == ["rank 2: TypeError: boom",
                     "dtype differs across ranks: 'float32' on ranks 0,2; 'float16' on rank 1"]
    assert len(FIELDS) == len(rows[0])


def test_single_rank_local_error_is_invalid_call():
    from mpi4py import MPI

    def bad():
        raise TypeError("unsupported dtype complex64")
    with pytest.raises(InvalidCollectiveCall, match="allreduce: TypeError: unsupported dtype complex64"):
        checked_call(MPI.COMM_SELF, True, ("allreduce", 4, "complex64", "sum", "ring", False), bad)
    out = checked_call(MPI.COMM_SELF, True, ("allreduce", 4, "float32", "sum", "ring", False), lambda: np.ones(4))
    assert out.shape == (4,)


@pytest.mark.parametrize("nprocs", [2, 3])
def test_argument_rejected_on_one_rank_raises_on_every_rank_and_the_next_call_is_exact(run_mpi, nprocs):
    """A list, a read-only out, a bad timeout or transport on one rank; allreduce_fp8 against allreduce."""
    res = run_mpi(nprocs, "tests/mpi/one_rank_rejects.py", timeout=150, env={"RINGLAB_TIMEOUT": "60"})
    assert f"one-rank cases ok: 12 on {nprocs} ranks" in res.stdout


def test_the_same_bad_call_everywhere_is_reported_once(run_mpi):
    res = run_mpi(3, "tests/mpi/one_rank_rejects.py", "--same", timeout=120)
    assert "same-call cases ok: 4 on 3 ranks" in res.stdout
    assert "same-call int8: allreduce: TypeError: unsupported dtype int8; supported:" in res.stdout


def test_exchange_has_one_length_for_every_collective():
    """allreduce_fp8 used to send 8 integers and the others 7: Open MPI then fails the exchange."""
    from ringlab import validate
    lengths = set()

    def record(comm, mine, recv, timeout, what):
        lengths.add(mine.size)
        recv[...] = mine

    class TwoRanks:                       # enough of a communicator for checked_call's fast path
        size, rank, attrs = 2, 0, {}

        def Get_attr(self, key):
            return self.attrs.get(key)

        def Set_attr(self, key, value):
            self.attrs[key] = value

    real = validate._bounded_allgather
    validate._bounded_allgather = record
    try:
        for sig in [("allreduce", 4, "float32", "sum", "ring", False),
                    ("allreduce_fp8", 4, "float32", "sum", "fp8-ring/e4m3/128 via None", False),
                    ("allreduce", 4, "float32", ["sum"], "ring", False)]:   # unhashable: hashed by text, no TypeError
            checked_call(TwoRanks(), True, sig, lambda: None)
    finally:
        validate._bounded_allgather = real
    assert len(lengths) == 1, lengths


def test_numpy_fast_path_matches_the_general_path():
    """api's NumPy fast path (the common call, checks written out) returns what the general path does,
    and hands every call it does not cover to it (which then reports any bad argument on every rank)."""
    from mpi4py import MPI
    from ringlab import api
    comm = MPI.COMM_SELF
    x = np.arange(10, dtype=np.float32)
    general = api._allreduce(x, comm=comm)           # checks the environment for N = 1 once
    fast = api._host_allreduce(x, None, "avg", "ring", comm, True)
    assert fast is not None and np.array_equal(fast, general / 1) and fast.dtype == x.dtype
    out = np.empty_like(x)
    assert api._host_allreduce(x, out, "sum", "ring", comm, True) is out and np.array_equal(out, x)
    z = x.copy()
    assert api._host_allreduce(z, z, "max", "ring", comm, True) is z and np.array_equal(z, x)       # in place
    assert api._host_allreduce(x, None, "sum", "rabenseifner", comm, True) is not None              # no ``into``
    z.flags.writeable = False
    assert api._host_allreduce(z, z, "sum", "ring", comm, True) is None
    for bad in (x.astype(">f4"), np.arange(10), x[::2], x.astype(np.complex64)):
        assert api._host_allreduce(bad, None, "avg", "ring", comm, True) is None, bad.dtype
    assert api._host_allreduce(x, np.empty(9, np.float32), "sum", "ring", comm, True) is None
    assert api._host_allreduce(x, out, "xor", "ring", comm, True) is None
    assert api._host_allreduce(x, out, "sum", "nope", comm, True) is None
    assert api._host_allreduce(x, out, "sum", "fp8-ring", comm, True) is None     # has its own checks
