"""MPI worker for tests/test_torch_mpi.py: ``torch_ddp.py MODE [args]``; prints one ``OK ...`` line per rank.

Modes: train (experiments/ddp_train.py's runs, checked), futures, mismatch (buckets differ across
ranks), ef (error feedback), backend (init_process_group("ringlab") collectives).
"""
import json
import os
import sys
import threading

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402

import ringlab  # noqa: E402
from ringlab import ddp_hooks, torch_backend  # noqa: E402

comm = MPI.COMM_WORLD
torch.set_num_threads(1)


def mode_train(argv):
    """argv: CHECKS_JSON then ddp_train.py arguments. Checks: exact variants vs gloo, agreement, EF gap."""
    from experiments import ddp_train
    checks = json.loads(argv[0])
    rows = {r["variant"]: r for r in ddp_train.main(argv[1:])}
    exact = rows["gloo"]["final_loss"]
    for name in checks.get("exact", []):
        rtol = checks.get("rtol", 1e-5)
        assert abs(rows[name]["final_loss"] - exact) <= rtol * exact, (name, rows[name]["final_loss"], exact)
        curve, ref = np.array(rows[name]["loss_curve"]), np.array(rows["gloo"]["loss_curve"])
        assert np.allclose(curve, ref, rtol=rtol), (name, np.abs(curve - ref).max())
    for r in rows.values():
        assert r["params_bitwise_equal"], (r["variant"], r["params_max_abs_diff"])
    if "ef" in checks:
        gap = {v: abs(rows[v]["final_loss"] / exact - 1) for v in ("fp8", "fp8-ef")}
        assert gap["fp8-ef"] < gap["fp8"], gap
    print(f"OK rank {comm.rank} " + " ".join(f"{v}={r['final_loss']:.6f}" for v, r in rows.items()), flush=True)


def mode_futures(argv):
    n, r = comm.size, comm.rank
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        t = torch.full((1000,), r + 1, dtype=dtype)
        threads = []
        fut = ringlab.allreduce_async(t, out=t).get_future()
        doubled = fut.then(lambda f: (threads.append(threading.current_thread().name), f.value() * 2)[1])
        got = doubled.wait()
        assert isinstance(fut.value(), torch.Tensor) and fut.value().dtype == dtype
        assert fut.value().data_ptr() == t.data_ptr(), "the future's value is the caller's tensor (in place)"
        assert torch.equal(got, torch.full((1000,), 2 * n * (n + 1) // 2, dtype=dtype)), got[:4]
        assert len(threads) == 1 and threads[0].startswith("ringlab-progress"), threads   # not a thread per call
    # out of place: a new tensor in the future, the input untouched
    x = torch.arange(10, dtype=torch.float32) * (r + 1)
    value = ringlab.allreduce_async(x).get_future().wait()
    assert torch.equal(value, torch.arange(10, dtype=torch.float32) * (n * (n + 1) // 2)) and x[1] == r + 1
    # a future already done when asked for
    work = ringlab.allreduce_async(torch.ones(3))
    work.wait()
    assert torch.equal(work.get_future().wait(), torch.full((3,), float(n)))
    # sizes that differ across ranks: the future holds the same cross-rank error on every rank
    try:
        ringlab.allreduce_async(torch.ones(10 + (r == 0))).get_future().wait()
    except Exception as exc:
        assert "count differs across ranks" in str(exc), exc
        print(f"OK rank {r} futures; mismatch: {type(exc).__name__}", flush=True)
        return
    raise AssertionError("no error for mismatched sizes")


class Bucket:
    """What a hook reads of DDP's GradBucket: the flat buffer and its index."""

    def __init__(self, buffer, index=0):
        self._buffer, self._index = buffer, index

    def buffer(self):
        return self._buffer

    def index(self):
        return self._index


def mode_mismatch(argv):
    """Every hook, fed buckets whose sizes differ across ranks: the same error on every rank.

    (DDP itself broadcasts rank 0's bucket layout when it rebuilds buckets, so DDP rarely hands
    ranks different buckets; a hook must still never hang when it happens.)"""
    hooks = [(ddp_hooks.RingHookState(), ddp_hooks.ring_allreduce_hook),
             (ddp_hooks.RingHookState(overlap=False), ddp_hooks.ring_allreduce_hook),
             (ddp_hooks.Fp8HookState(), ddp_hooks.fp8_allreduce_hook),
             (ddp_hooks.Fp8ErrorFeedbackState(), ddp_hooks.fp8_error_feedback_hook)]
    for state, hook in hooks:
        for dtype in (torch.float32, torch.bfloat16):             # agreeing ranks first: the hook works
            good = hook(state, Bucket(torch.ones(300, dtype=dtype))).wait()
            assert good.dtype == dtype and torch.allclose(good.float(), torch.ones(300), rtol=0.07), good[:4]
        try:
            hook(state, Bucket(torch.ones(300 + 5 * (comm.rank == 0)))).wait()
        except Exception as exc:
            assert type(exc).__name__ == "InvalidCollectiveCall" and "count differs across ranks" in str(exc), exc
            continue
        raise AssertionError(f"{hook.__name__}: no error although the ranks' buckets differ")
    print(f"OK rank {comm.rank} mismatch raised by every hook", flush=True)


def mode_ef(argv):
    """The same gradient bucket K times: error feedback keeps the accumulated update close to K x exact.

    Plain FP8 makes the same rounding error every step (it adds up); error feedback carries what this
    rank's message lost into the next step, so the sum of the updates converges to the exact sum
    (what is left is the owner's re-quantization of the sum, which no rank can see)."""
    n = 20000
    common = torch.randn(n, generator=torch.Generator().manual_seed(99))
    x = common + 0.5 * torch.randn(n, generator=torch.Generator().manual_seed(comm.rank))
    x = x * torch.exp(2 * torch.randn(n, generator=torch.Generator().manual_seed(7)))   # wide dynamic range
    exact = torch.from_numpy(np.mean(comm.allgather(x.numpy()), axis=0))
    for algo in ("direct", "ring"):
        plain_state, ef_state = ddp_hooks.Fp8HookState(algo=algo), ddp_hooks.Fp8ErrorFeedbackState(algo=algo)
        plain, ef = torch.zeros(n), torch.zeros(n)
        steps = 30
        for _ in range(steps):
            plain += ddp_hooks.fp8_allreduce_hook(plain_state, Bucket(x.clone())).wait()
            ef += ddp_hooks.fp8_error_feedback_hook(ef_state, Bucket(x.clone())).wait()
        rel = {name: float((acc - steps * exact).norm() / (steps * exact).norm()) for name, acc in
               (("plain", plain), ("ef", ef))}
        assert rel["ef"] < 0.75 * rel["plain"], (algo, rel)
        assert set(ef_state.residuals) == {0} and ef_state.residuals[0].shape == x.shape
    print(f"OK rank {comm.rank} ef {algo}: accumulated error plain {rel['plain']:.4f}, with feedback {rel['ef']:.4f}",
          flush=True)


def mode_backend(argv):
    n, r = comm.size, comm.rank
    torch_backend.init_process_group()
    assert dist.get_backend() == "ringlab" and dist.get_world_size() == n and dist.get_rank() == r
    for dtype in (torch.float32, torch.bfloat16, torch.float64, torch.int32):
        t = torch.full((7,), r + 1, dtype=dtype)
        dist.all_reduce(t)
        assert torch.equal(t, torch.full((7,), n * (n + 1) // 2, dtype=dtype)), (dtype, t)
    t = torch.full((5,), float(r))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    assert torch.equal(t, torch.full((5,), float(n - 1)))
    work = dist.all_reduce(torch.ones(4), async_op=True)
    work.wait()
    out = torch.empty(n * 3)
    dist.all_gather_into_tensor(out, torch.full((3,), float(r)))
    assert torch.equal(out, torch.arange(n, dtype=torch.float32).repeat_interleave(3))
    parts = [torch.empty(2) for _ in range(n)]
    dist.all_gather(parts, torch.full((2,), float(r)))
    assert all(torch.equal(p, torch.full((2,), float(i))) for i, p in enumerate(parts))
    mine = torch.empty(2)
    dist.reduce_scatter_tensor(mine, torch.arange(2.0 * n))
    assert torch.equal(mine, n * torch.arange(2.0 * r, 2.0 * r + 2))
    mine = torch.empty(2)
    dist.reduce_scatter(mine, [torch.full((2,), float(i)) for i in range(n)])
    assert torch.equal(mine, torch.full((2,), float(n * r)))
    b = torch.full((3,), float(r))
    dist.broadcast(b, src=1 % n)
    assert torch.equal(b, torch.full((3,), float(1 % n)))
    dist.barrier()
    dist.destroy_process_group()
    print(f"OK rank {r} backend", flush=True)


if __name__ == "__main__":
    modes = {"train": mode_train, "futures": mode_futures, "mismatch": mode_mismatch, "ef": mode_ef,
             "backend": mode_backend}
    modes[sys.argv[1]](sys.argv[2:])
