"""One call shape (issue 14): the same positional order everywhere, FP8 knobs keyword-only, one
transport vocabulary, algo/transport on every collective, distinct names for host "direct" and FP8's."""
import inspect

import numpy as np
import pytest
from mpi4py import MPI

import ringlab
from ringlab.settings import TRANSPORTS

SHAPE = ["x", "out", "op", "algo", "comm", "timeout"]


def _positional(fn):
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("fn", [ringlab.allreduce, ringlab.reduce_scatter, ringlab.allreduce_fp8,
                                ringlab.allreduce_async, ringlab.reduce_scatter_async])
def test_same_positional_order(fn):
    assert _positional(fn)[:len(SHAPE)] == SHAPE
    params = inspect.signature(fn).parameters
    assert "transport" in params and "validate" in params


@pytest.mark.parametrize("fn", [ringlab.allgather, ringlab.allgather_async])
def test_allgather_has_no_op_so_everything_after_out_is_keyword_only(fn):
    assert _positional(fn) == ["x", "out"]
    assert {"algo", "comm", "timeout", "transport"} <= set(inspect.signature(fn).parameters)


def test_fp8_knobs_are_keyword_only():
    params = inspect.signature(ringlab.allreduce_fp8).parameters
    assert all(params[k].kind == params[k].KEYWORD_ONLY for k in ("fmt", "block"))
    assert params["algo"].default == "fp8-ring"


def test_fp8_direct_and_host_direct_are_distinct_names_and_old_names_still_work():
    x = np.arange(256, dtype=np.float32)
    comm = MPI.COMM_SELF
    assert "direct" in ringlab.ALLREDUCE_ALGORITHMS and "fp8-direct" in ringlab.ALLREDUCE_ALGORITHMS
    new = ringlab.allreduce_fp8(x, algo="fp8-direct", comm=comm)
    old = ringlab.allreduce_fp8(x, algo="direct", comm=comm)       # the earlier name: an alias
    assert np.array_equal(new, old)
    with pytest.raises(ringlab.InvalidCollectiveCall, match="fp8-ring, fp8-direct"):
        ringlab.allreduce_fp8(x, algo="qgz", comm=comm)


def test_reduce_scatter_and_allgather_take_algo_and_transport():
    x = np.arange(12, dtype=np.float32)
    comm = MPI.COMM_SELF
    assert np.array_equal(ringlab.reduce_scatter(x, algo="ring", transport="auto", comm=comm), x)
    assert np.array_equal(ringlab.allgather(x, algo="ring", transport="mpi", comm=comm)[0], x)
    with pytest.raises(ringlab.InvalidCollectiveCall, match="unknown algo 'rabenseifner'"):
        ringlab.reduce_scatter(x, algo="rabenseifner", comm=comm)


@pytest.mark.parametrize("collective", [ringlab.allreduce, ringlab.reduce_scatter, ringlab.allgather,
                                        ringlab.allreduce_fp8])
def test_one_transport_vocabulary(collective):
    x = np.ones(8, np.float32)
    with pytest.raises(ringlab.InvalidCollectiveCall) as info:
        collective(x, transport="nvlink", comm=MPI.COMM_SELF)
    assert all(name in str(info.value) for name in TRANSPORTS)
    with pytest.raises(ringlab.InvalidCollectiveCall, match="device"):
        ringlab.allreduce(x, transport="ipc", comm=MPI.COMM_SELF)
