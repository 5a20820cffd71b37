"""Bucketed gradient all-reduce equals per-tensor all-reduce and the float64 closed form."""
import numpy as np
from mpi4py import MPI

from ringlab import allreduce
from ringlab.teach.overlap import DataParallelStep, GradientBuckets, SimulatedBackward, bucketed_allreduce

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank

# 1. bucketed_allreduce == one allreduce per tensor, for odd shapes and every bucket regime
shapes = [(3, 5), (17,), (2, 2, 2), (1,), (101,), (n + 1, 3)]
rng = np.random.default_rng(7 + rank)
tensors = [rng.integers(-50, 50, s).astype(np.float32) for s in shapes]
for bucket_bytes in (1, 40, 300, 1 << 30):          # one tensor each ... one bucket for all
    for op in ("sum", "max", "avg"):
        got = bucketed_allreduce(tensors, bucket_bytes, op=op)
        want = [allreduce(t, op=op) for t in tensors]
        for i, (g, w) in enumerate(zip(got, want)):
            assert g.shape == w.shape and np.array_equal(g, w), f"rank {rank}: tensor {i}, bucket {bucket_bytes} B, {op}"

# 2. the simulated backward with gradients all-reduced as buckets become ready
backward = SimulatedBackward(layers=5, hidden=24, batch=7, rank=rank)
for bucket_bytes in (1, 24 * 24 * 4 * 2, 1 << 30):
    buckets = GradientBuckets(backward.shapes, "float32", bucket_bytes, op="avg")
    expected_buckets = {1: 5, 24 * 24 * 4 * 2: 3, 1 << 30: 1}[bucket_bytes]
    assert len(buckets.buckets) == expected_buckets, (bucket_bytes, buckets.bucket_nbytes)
    step = DataParallelStep(backward, buckets)
    for attempt in range(2):                       # a step can be repeated: inputs stay intact
        grads = step.overlapped(timeout=60)
        for l, g in enumerate(grads):
            ref = backward.reference(l, n, "avg")
            assert np.allclose(g, ref, rtol=2 ** -22, atol=0), f"rank {rank}: layer {l} bucket {bucket_bytes}"
    step.compute()
    for l, g in enumerate(step.communicate(timeout=60)):
        assert np.allclose(g, backward.reference(l, n, "avg"), rtol=2 ** -22, atol=0)

# 3. misuse fails clearly instead of hanging
buckets = GradientBuckets([(4,), (4,)], "float32", 1 << 20)
buckets.mark_ready(1)
try:
    buckets.mark_ready(1)
    raise AssertionError("double mark_ready not caught")
except ValueError as exc:
    assert "twice" in str(exc)
try:
    buckets.wait(5)
    raise AssertionError("wait with unlaunched buckets not caught")
except RuntimeError as exc:
    assert "never marked ready" in str(exc)
print(f"rank {rank}: bucketed all-reduce OK", flush=True)
