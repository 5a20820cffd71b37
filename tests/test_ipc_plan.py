"""The pull plan the IPC rings execute on the GPU, run here with NumPy (no GPU, no MPI); the executors' shape.

Each step's entries must be independent of each other (the shared-GPU ring issues them in one
launch, the per-rank ring runs them concurrently), so the plan is executed in both rank orders,
in place and out of place, and must give every rank the exact sum.
"""
import inspect

import numpy as np
import pytest

from ringlab.gpu.ring_steps import ring_pull_plan


def run_plan(srcs, outs, order):
    n = len(srcs)
    for step in ring_pull_plan(n, srcs[0].size):
        for k in order(n):
            lo, hi, reduce, from_input = step[k]
            peer = srcs[k - 1] if from_input else outs[k - 1]
            if reduce:
                outs[k][lo:hi] = srcs[k][lo:hi] + peer[lo:hi]
            else:
                outs[k][lo:hi] = peer[lo:hi]


@pytest.mark.parametrize("n", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("count", [1, 7, 1009])
@pytest.mark.parametrize("order", [lambda n: range(n), lambda n: reversed(range(n))], ids=["forward", "reverse"])
@pytest.mark.parametrize("inplace", [False, True])
def test_plan_is_an_allreduce(n, count, order, inplace):
    rng = np.random.default_rng([n, count])
    inputs = [rng.integers(-1000, 1000, count).astype(np.int64) for _ in range(n)]
    srcs = [a.copy() for a in inputs]
    outs = srcs if inplace else [np.full(count, 123456789, np.int64) for _ in range(n)]
    run_plan(srcs, outs, order)
    total = np.sum(inputs, axis=0)
    for k in range(n):
        assert np.array_equal(outs[k], total), f"rank {k}"


@pytest.mark.parametrize("n", [2, 4, 7])
def test_plan_follows_the_schedule_and_moves_5_n_minus_1_s(n):
    count = 100 * n
    plan = ring_pull_plan(n, count)
    assert len(plan) == 2 * (n - 1)
    assert [step[0][2] for step in plan] == [True] * (n - 1) + [False] * (n - 1)
    assert all(e[3] == (j == 0) for j, step in enumerate(plan) for e in step)
    moved = sum((3 if e[2] else 2) * (e[1] - e[0]) for step in plan for e in step)   # elements read + written
    assert moved == 5 * (n - 1) * count


def test_gpu_executors_are_siblings_with_one_call_shape():
    """No executor inherits another; each is composed from PeerMemory and is called allreduce(src, out, op, timeout)."""
    from ringlab.gpu.device_ring import DeviceRing
    from ringlab.gpu.fp8_ipc import Fp8IpcRing
    from ringlab.gpu.ipc import IpcRing, SharedGpuRing, ring_pull_plan as reexported
    from ringlab.gpu.ipc_direct import IpcDirect
    assert reexported is ring_pull_plan
    for cls in (IpcRing, SharedGpuRing, IpcDirect, Fp8IpcRing, DeviceRing):
        assert cls.__bases__ == (object,), cls
        params = list(inspect.signature(cls.allreduce).parameters)
        assert params == ["self", "src", "out", "op", "timeout"], (cls, params)
        assert inspect.signature(cls.allreduce).parameters["timeout"].default is None
        assert isinstance(inspect.getattr_static(cls, "opened"), property), cls      # the leak check counts it
    assert "algo" in inspect.signature(IpcDirect).parameters
    assert {"fmt", "block"} <= set(inspect.signature(Fp8IpcRing).parameters)


@pytest.mark.parametrize("nprocs", [1, 3])
def test_ipc_executors_over_a_fake_cupy(run_mpi, nprocs):
    """Every IPC executor (and the transition shims) over fake device memory: exact results, FP8 equal to the host
    ring bit for bit, no mapping growth on reused buffers, all mappings and counters released at close."""
    res = run_mpi(nprocs, "tests/mpi/ipc_fake_cupy_check.py", timeout=240)
    assert f"ipc_fake_cupy_check OK: N={nprocs}" in res.stdout, res.stdout[-2000:]
