"""Ring reduce-scatter, ring all-gather, and ring all-reduce, run as the ring's primitives (primitives.py).

On a host transport each neighbouring pair of primitives is one sendrecv; the picture is the schedule.
"""
# The schedule for N = 4 ranks a, b, c, d and chunks 0..3 (the ring derivation):
#
#     reduce-scatter: at step s rank r sends chunk (r-s) to r+1, receives chunk (r-s-1) from r-1, adds
#
#               a ──▶ b ──▶ c ──▶ d ──┐
#               ▲                     │
#               └─────────────────────┘
#       step   a sends        b sends        c sends        d sends
#         0    a0             b1             c2             d3
#         1    a3+d3          b0+a0          c1+b1          d2+c2
#         2    a2+c2+d2       b3+a3+d3       c0+a0+b0       d1+b1+c1
#       after: a owns chunk 1 (a1+b1+c1+d1), b owns 2, c owns 3, d owns 0   -> rank r owns (r+1) mod N
#
#     all-gather: the same walk without the addition: at step s rank r sends chunk (r+1-s),
#     receives chunk (r-s) and overwrites its copy. After N-1 steps every rank holds every sum.
#
#     As primitives (NCCL's runRing): send, recv_reduce_send x N-2, recv_reduce_copy_send (avg divides
#     here, at the owner), recv_copy_send x N-2, recv.
#
#     Per rank: 2(N-1) messages of S/N bytes = 2(N-1)/N * S, which does not grow with N.

import functools

import numpy as np

from ringlab.arrays import array_module
from ringlab import faults
from ringlab.kernels.optable import OP_TABLE
from ringlab.primitives import (program_steps, ring_allgather_program, ring_allreduce_program,
                                ring_reduce_scatter_program)
from ringlab.schedule import chunk_bounds
from ringlab.transport import env_unset

__all__ = ["ring_reduce_scatter_inplace", "ring_allgather_inplace", "ring_allreduce_inplace", "scratch_buffer",
           "divide_inplace", "step_fault"]


def step_fault(rank):
    """faults.ring_step_hook(rank), without reading the environment when no fault can be planned."""
    if env_unset("RINGLAB_FAULT") and getattr(faults, "_override", None) is getattr(faults, "_UNSET", False):
        return None      # neither $RINGLAB_FAULT nor faults.set_fault: no plan (faults.planned_fault)
    return faults.ring_step_hook(rank)


def scratch_buffer(cache, key, nbytes, dtype, xp=np):
    """A reusable buffer ``cache[key]`` of at least ``nbytes`` bytes (grown on demand), as ``dtype``."""
    buf = cache.get(key)
    if buf is None or buf.nbytes < nbytes:
        buf = xp.empty(max(nbytes, 1), dtype=xp.uint8)
        cache[key] = buf
    return buf[:nbytes].view(dtype)


def divide_inplace(chunk, n):
    """chunk /= n in the chunk's own dtype: avg's single division at the chunk's owner."""
    array_module(chunk).divide(chunk, n, out=chunk, casting="unsafe")


@functools.lru_cache(maxsize=256)
def _steps(kind, rank, nranks, rotate, count):
    """The host sendrecv steps of a program, built once per (kind, rank, N, rotate, count): per step the
    schedule step, its send and receive ranges, its name, reduce? and final? (primitives.program_steps)."""
    if kind == "allreduce":
        program = ring_allreduce_program(rank, nranks)
    else:
        program = (ring_reduce_scatter_program if kind == "reduce-scatter" else ring_allgather_program)(
            rank, nranks, rotate)
    bounds = chunk_bounds(count, nranks)
    return bounds[0][1], tuple((out.send, bounds[out.send.send_chunk], bounds[out.send.recv_chunk],
                                f"ring {out.send.phase} step {out.send.step}", into.reduce, into.final)
                               for out, into in program_steps(program))


def _run_program(buf, transport, kind, rotate=0, op="sum", trace=None, cache=None):
    """Execute one rank's primitives of program ``kind`` over ``transport``: each step sends one primitive's
    chunk and receives the next primitive's, reducing it (into a scratch buffer first) or receiving in
    place (the chunk being overwritten is never the one being sent)."""
    comm = transport.comm
    n = comm.size
    xp = np if type(buf) is np.ndarray else array_module(buf)
    fault = step_fault(comm.rank)  # None unless a test planned a fault (RINGLAB_FAULT)
    recv_all = None
    sendrecv = transport.sendrecv
    largest, steps = _steps(kind, comm.rank, n, rotate, buf.size)
    for st, (s0, s1), (r0, r1), what, reduce, final in steps:
        if fault is not None:
            fault(st)
        if reduce:
            if recv_all is None:
                recv_all = scratch_buffer(cache if cache is not None else {}, "recv" if xp is np else "recv-device",
                                          largest * buf.itemsize, buf.dtype, xp)
                if op not in OP_TABLE:
                    raise ValueError(f"unknown op {op!r}")
                combine = getattr(xp, OP_TABLE[op].ufunc)          # ops.reduce_into's ufunc, looked up once
            recv = recv_all[: r1 - r0]
            sendrecv(buf[s0:s1], st.send_to, recv, st.recv_from, what=what)
            dst = buf[r0:r1]
            combine(dst, recv, out=dst)
        else:
            sendrecv(buf[s0:s1], st.send_to, buf[r0:r1], st.recv_from, what=what)
        if trace is not None:
            trace(st, buf)
        if final and op == "avg":
            divide_inplace(buf[r0:r1], n)               # avg's post-op, once, at the chunk's owner


def ring_reduce_scatter_inplace(buf, transport, op="sum", rotate=0, trace=None, cache=None):
    """Reduce-scatter a flat buffer in place around the ring (host memory, or device memory when
    the transport is CUDA-aware).

    Afterwards this rank's chunk ``reduce_scatter_owner(rank, N, rotate)`` holds the reduction of
    every rank's copy of that chunk; other chunks hold partial sums. ``trace(step, buf)`` is called
    after each step (the walkthrough uses it). ``avg`` accumulates a sum here (the caller divides).
    """
    _run_program(buf, transport, "reduce-scatter", rotate, "sum" if op == "avg" else op, trace, cache)


def ring_allgather_inplace(buf, transport, rotate=0, trace=None):
    """All-gather a flat host buffer in place: every rank starts owning chunk
    ``reduce_scatter_owner(rank, N, rotate)`` and ends with all chunks."""
    _run_program(buf, transport, "all-gather", rotate, trace=trace)


def ring_allreduce_inplace(buf, transport, op="sum", trace=None, cache=None):
    """Ring all-reduce of a flat host buffer, in place: the 2N-1 primitives of ``ring_allreduce_program``.

    ``avg`` divides once, at the chunk's owner (recv_reduce_copy_send's post-op); every rank then
    receives the owner's bytes, so all ranks end bitwise identical.
    """
    _run_program(buf, transport, "allreduce", 0, op, trace, cache)
