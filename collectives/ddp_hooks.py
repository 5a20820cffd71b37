"""Ready-made DDP communication hooks: ``ddp_model.register_comm_hook(state, hook)``."""
#     from ringlab.ddp_hooks import RingHookState, ring_allreduce_hook
#     ddp_model.register_comm_hook(RingHookState(algo="ring"), ring_allreduce_hook)
#
# Hooks are plain functions ``(state, bucket) -> torch.futures.Future`` (PyTorch's default_hooks.py
# shape); compression keeps its memory in the state object (powerSGD_hook.py's shape). Every hook
# averages: the bucket is divided by N, then summed across ranks on ringlab's progress thread, so
# backward keeps running meanwhile; the future's value is the bucket buffer itself (reduced in place).
#
# - ``ring_allreduce_hook``: exact all-reduce with any registered ``algo`` (ring, auto, ...).
# - ``fp8_allreduce_hook``: FP8 payloads with per-block scales (``allreduce_fp8``): ~3.9x fewer bytes.
# - ``fp8_error_feedback_hook``: FP8 with error feedback: each rank keeps, per bucket, what its own
#   compressed contribution lost (x - D(Q(x)), block by block as the collective quantizes it) and
#   adds it to that bucket next step, so small gradients are delayed instead of flushed to zero.
#
# Ranks that disagree on a bucket's size or dtype get ringlab's InvalidCollectiveCall on every rank,
# raised from the future (so from DDP's backward), not a hang. Importing this module imports torch.

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from mpi4py import MPI

from ringlab import api, fp8 as ringlab_fp8
from ringlab.arrays import as_array, to_torch
from ringlab.kernels.codec import codec_for
from ringlab.schedule import chunk_bounds
from ringlab.work import _launch

__all__ = ["RingHookState", "Fp8HookState", "Fp8ErrorFeedbackState", "ring_allreduce_hook", "fp8_allreduce_hook",
           "fp8_error_feedback_hook", "wire_bytes_per_rank"]


@dataclass
class RingHookState:
    """How the exact hook all-reduces: ``comm`` (default COMM_WORLD), ``algo``, ``timeout`` (s), and
    ``overlap``: True runs it on ringlab's progress thread while backward goes on; False runs it in
    backward's own thread (faster when the ranks already fill every core: nothing to overlap with)."""
    comm: Any = None
    algo: str = "ring"
    timeout: Optional[float] = None
    overlap: bool = True

    def communicator(self):
        return self.comm if self.comm is not None else MPI.COMM_WORLD


@dataclass
class Fp8HookState(RingHookState):
    """FP8 hook settings: ``fmt`` e4m3/e5m2, ``block`` elements per fp32 scale, ``algo`` ring/direct."""
    algo: str = "direct"
    fmt: str = "e4m3"
    block: int = 128


@dataclass
class Fp8ErrorFeedbackState(Fp8HookState):
    """Fp8HookState plus ``residuals``: bucket index -> this rank's carried compression error."""
    residuals: dict = field(default_factory=dict)


def _averaged_buffer(state, bucket):
    buf = bucket.buffer()
    buf.div_(state.communicator().size)
    return buf


def _reduce_in_place(state, buf, what, run):
    """``run(comm, a)`` all-reduces ``a`` (``buf``'s array view) in place; returns the future of ``buf``."""
    a = as_array(buf)
    if state.overlap:
        return _launch(what, state.communicator(), lambda pcomm: run(pcomm, a), a).get_future()
    run(state.communicator(), a)
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def ring_allreduce_hook(state, bucket):
    """Average ``bucket`` over the ranks with ringlab's exact all-reduce (``state.algo``)."""
    return _reduce_in_place(state, _averaged_buffer(state, bucket), "allreduce", lambda comm, a: api.allreduce(
        a, out=a, algo=state.algo, comm=comm, timeout=state.timeout))


def _fp8_reduce(state, buf):
    return _reduce_in_place(state, buf, "allreduce_fp8", lambda comm, a: ringlab_fp8.allreduce_fp8(
        a, out=a, fmt=state.fmt, block=state.block, algo=state.algo, op="sum", comm=comm, timeout=state.timeout))


def fp8_allreduce_hook(state, bucket):
    """Average ``bucket`` with the FP8-compressed all-reduce (no error compensation)."""
    return _fp8_reduce(state, _averaged_buffer(state, bucket))


def local_fp8_error(x, nranks, rank, fmt, block, algo):
    """x - D(Q(x)) per ring chunk, with the chunk-aligned blocks the collective quantizes this rank's
    contribution in; ``algo="direct"`` never quantizes the rank's own chunk, so its error there is 0."""
    codec = codec_for(x, fmt, block)
    err = x.copy()
    if nranks == 1:          # one rank sends nothing: nothing is lost
        err[...] = 0
        return err
    for c, (lo, hi) in enumerate(chunk_bounds(x.size, nranks)):
        if hi == lo or (algo == "direct" and c == rank and nranks > 1):
            err[lo:hi] = 0
            continue
        msg = codec.message(hi - lo)
        codec.quantize(x[lo:hi], msg)
        approx = codec.xp.empty(hi - lo, dtype=x.dtype)
        codec.dequantize(msg, approx)
        err[lo:hi] -= approx
    return err


def fp8_error_feedback_hook(state, bucket):
    """FP8 all-reduce of (bucket / N + residual); the part this rank's FP8 message could not carry
    becomes the bucket's residual for the next step (reset when DDP rebuilds its buckets)."""
    buf = _averaged_buffer(state, bucket)
    comm = state.communicator()
    residual = state.residuals.get(bucket.index())
    if residual is not None and residual.shape == buf.shape and residual.dtype == buf.dtype:
        buf.add_(residual)
    flat = as_array(buf).reshape(-1)
    err = local_fp8_error(flat, comm.size, comm.rank, state.fmt, state.block, state.algo)
    state.residuals[bucket.index()] = to_torch(err).view(buf.shape)
    return _fp8_reduce(state, buf)


def wire_bytes_per_rank(count, nranks, itemsize=4, fp8_block=None):
    """Payload bytes one rank sends for an all-reduce of ``count`` elements: the ring's 2(N-1) chunks,
    or (``fp8_block``) the FP8 messages (1 byte per element + one fp32 scale per block, per chunk)."""
    from ringlab.kernels.reference import fp8_message_nbytes
    chunks = [hi - lo for lo, hi in chunk_bounds(count, nranks)]
    if nranks == 1:
        return 0
    per_chunk = [fp8_message_nbytes(c, fp8_block) if fp8_block else c * itemsize for c in chunks]
    # reduce-scatter and all-gather each send N-1 of the N chunks; over all ranks every chunk is sent
    # equally often, so the per-rank average is (N-1)/N of the total, twice.
    return int(round(2 * (nranks - 1) * sum(per_chunk) / nranks))
