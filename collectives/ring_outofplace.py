"""Out-of-place ring reduce-scatter and all-reduce: the input is only read, never copied whole."""
# The in-place ring (ring.py) reduces into the caller's buffer, so an out-of-place call used to copy the
# whole input first. Here step 0 sends the rank's own chunk straight from the input, and each received
# partial sum is reduced *in the receive buffer* (own chunk op received: the in-place ring's operand
# order, so results are bitwise those of ring.py) and forwarded from there. reduce_scatter alternates
# two chunk buffers (``out`` and one scratch): input + 2 chunks. All-reduce receives each chunk into its
# own place in ``out`` and all-gathers there: input + output, no scratch at all.

import numpy as np

from ringlab.arrays import array_module
from ringlab.ring import divide_inplace, scratch_buffer, step_fault
from ringlab.schedule import (chunk_bounds, reduce_scatter_owner, ring_allgather_schedule,
                              ring_reduce_scatter_schedule)

__all__ = ["ring_reduce_scatter_into", "ring_allreduce_into", "ring_reduce_scatter_slots"]

_UFUNC = {"sum": "add", "avg": "add", "prod": "multiply", "max": "maximum", "min": "minimum"}


def ring_reduce_scatter_into(x, out, transport, op="sum", cache=None):
    """Reduce-scatter flat ``x`` (left unchanged) into flat ``out``: rank r's chunk ``chunk_bounds(x.size, N)[r]``.

    Works on host buffers, and on device buffers with a CUDA-aware transport. ``avg`` divides once at the end.
    """
    comm = transport.comm
    n, r = comm.size, comm.rank
    bounds = chunk_bounds(x.size, n)
    lo, hi = bounds[r]
    xp = array_module(x)
    if n == 1:
        out[...] = x[lo:hi]
    else:
        combine = getattr(xp, _UFUNC[op])
        largest = bounds[0][1] - bounds[0][0]
        cache = cache if cache is not None else {}
        # ``out`` can take a turn as receive buffer only when every chunk fits in it (sizes differ by <= 1).
        spare = [scratch_buffer(cache, "rs-a", largest * x.itemsize, x.dtype, xp)]
        spare.append(out if out.size >= largest else scratch_buffer(cache, "rs-b", largest * x.itemsize, x.dtype, xp))
        fault = step_fault(r)
        steps = ring_reduce_scatter_schedule(r, n, rotate=-1)
        s0, s1 = bounds[steps[0].send_chunk]
        send = x[s0:s1]          # the first hop forwards this rank's own copy: no working copy of the input
        for i, st in enumerate(steps):
            if fault is not None:
                fault(st)
            r0, r1 = bounds[st.recv_chunk]
            recv = spare[(n - 2 - i) % 2 == 0][: r1 - r0]   # parity: the last step receives into spare[1]
            transport.sendrecv(send, st.send_to, recv, st.recv_from, what=f"ring reduce-scatter step {st.step}")
            combine(x[r0:r1], recv, out=recv)
            send = recv
        if spare[1] is not out:
            out[...] = send
    if op == "avg":
        divide_inplace(out, n)
    return out


def ring_reduce_scatter_slots(x, slots, transport, op="sum", rotate=0):
    """Reduce-scatter flat ``x`` (unchanged) into ``slots`` (same size): each received chunk lands in its
    own place, so rank r's ``reduce_scatter_owner(r, N, rotate)`` chunk of ``slots`` ends fully reduced
    (the other chunks hold partial sums). No scratch; ``avg`` is left as a sum. Returns the owned (lo, hi)."""
    comm = transport.comm
    n, r = comm.size, comm.rank
    bounds = chunk_bounds(x.size, n)
    own = bounds[reduce_scatter_owner(r, n, rotate)]
    if n == 1:
        slots[...] = x
        return own
    combine = getattr(array_module(x), _UFUNC[op])
    fault = step_fault(r)
    steps = ring_reduce_scatter_schedule(r, n, rotate)
    s0, s1 = bounds[steps[0].send_chunk]
    send = x[s0:s1]
    for st in steps:
        if fault is not None:
            fault(st)
        r0, r1 = bounds[st.recv_chunk]
        recv = slots[r0:r1]
        transport.sendrecv(send, st.send_to, recv, st.recv_from, what=f"ring reduce-scatter step {st.step}")
        combine(x[r0:r1], recv, out=recv)
        send = recv
    return own


def _allreduce_plan(count, n, r):
    """The out-of-place ring all-reduce's steps for (count, N, rank), built once: per step (RingStep,
    send from x?, send range, dest, receive range, source, what); plus the owned chunk's range."""
    key = (count, n, r)
    plan = _PLANS.get(key)
    if plan is None:
        bounds = chunk_bounds(count, n)

        def steps(schedule, first_from_x):
            return tuple((st, first_from_x and st.step == 0) + bounds[st.send_chunk] + (st.send_to,)
                         + bounds[st.recv_chunk] + (st.recv_from, f"ring {st.phase} step {st.step}")
                         for st in schedule)
        plan = (steps(ring_reduce_scatter_schedule(r, n), True), bounds[reduce_scatter_owner(r, n)],
                steps(ring_allgather_schedule(r, n), False))
        if len(_PLANS) >= 256:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


_PLANS = {}


def ring_allreduce_into(x, out, transport, op="sum", cache=None):
    """Ring all-reduce of flat ``x`` into flat ``out`` (not ``x``): bitwise ring.ring_allreduce_inplace's
    result, with peak memory input + output."""
    try:
        n, r = transport.size, transport.rank          # MpiTransport keeps them (no MPI call per step)
    except AttributeError:
        n, r = transport.comm.size, transport.comm.rank
    if n == 1:
        out[...] = x
        if op == "avg":
            divide_inplace(out, 1)
        return out
    rs, (lo, hi), ag = _allreduce_plan(x.size, n, r)
    # reduce-scatter as ring_reduce_scatter_slots: each chunk is received into its own place in out
    combine = _NUMPY_UFUNC[op] if type(x) is np.ndarray else getattr(array_module(x), _UFUNC[op])
    fault = step_fault(r)
    sendrecv = transport.sendrecv
    for st, from_x, s0, s1, dest, r0, r1, source, what in rs:
        if fault is not None:
            fault(st)
        recv = out[r0:r1]
        sendrecv((x if from_x else out)[s0:s1], dest, recv, source, what=what)
        combine(x[r0:r1], recv, out=recv)
    if op == "avg":
        divide_inplace(out[lo:hi], n)
    for st, _, s0, s1, dest, r0, r1, source, what in ag:     # all-gather in place (ring.ring_allgather_inplace)
        if fault is not None:
            fault(st)
        sendrecv(out[s0:s1], dest, out[r0:r1], source, what=what)
    return out


_NUMPY_UFUNC = {op: getattr(np, name) for op, name in _UFUNC.items()}
