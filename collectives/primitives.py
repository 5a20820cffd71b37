"""The ring all-reduce written once, as NCCL-style primitives over the pure schedule (NCCL's runRing).

send, recv_reduce_send x N-2, recv_reduce_copy_send, recv_copy_send x N-2, recv: primitive i receives what the
left's primitive i-1 sent. ring.py runs the list over MPI, gpu/device_ring.py on the GPU (docs/device_ring.md).
"""
from dataclasses import dataclass

from ringlab.schedule import RingStep, ring_allgather_schedule, ring_reduce_scatter_schedule

__all__ = ["Primitive", "PRIMITIVE_KINDS", "ring_allreduce_program", "ring_reduce_scatter_program",
           "ring_allgather_program", "program_steps"]

PRIMITIVE_KINDS = ("send", "recv_reduce_send", "recv_reduce_copy_send", "recv_copy_send", "recv",
                   "recv_reduce_copy")


@dataclass(frozen=True)
class Primitive:
    """One primitive of one rank. ``recv``/``send`` are the schedule steps it receives from and sends at
    (None when it does not); ``reduce``: add the received chunk into the local one, else overwrite it;
    ``final``: the chunk is complete after this primitive (the owner's post-op, e.g. avg's division);
    ``reread``: the index of this rank's earlier primitive that sent the chunk this one overwrites
    (the right neighbour read it then; a pull executor must not overwrite it before), or None."""
    kind: str
    index: int
    chunk: int
    recv: RingStep = None
    send: RingStep = None
    reduce: bool = False
    final: bool = False
    reread: int = None


def _kind(recv, send):
    if recv is None:
        return "send"
    if recv.reduce:
        if send is None:
            return "recv_reduce_copy"
        return "recv_reduce_copy_send" if not send.reduce else "recv_reduce_send"
    return "recv_copy_send" if send is not None else "recv"


def _program(recvs, sends):
    """Pair step i-1's receive with step i's send into primitive i (both name the same chunk)."""
    prims, sent_at = [], {}
    for i in range(max(len(sends), len(recvs) + 1) if (sends or recvs) else 0):
        recv = recvs[i - 1] if 0 < i <= len(recvs) else None
        send = sends[i] if i < len(sends) else None
        chunk = send.send_chunk if send is not None else recv.recv_chunk
        if recv is not None and send is not None and recv.recv_chunk != send.send_chunk:
            raise AssertionError("schedule invariant broken: a step's received chunk is the next step's sent chunk")
        final = recv is not None and recv.reduce and (send is None or not send.reduce)
        reread = sent_at.get(chunk) if recv is not None else None
        prims.append(Primitive(_kind(recv, send), i, chunk, recv, send, recv is not None and recv.reduce,
                               final, reread))
        if send is not None:
            sent_at[chunk] = i
    return prims


def ring_allreduce_program(rank, nranks):
    """The 2N-1 primitives of ``rank`` in a ring all-reduce of ``nranks`` (empty for one rank)."""
    if nranks == 1:
        return []
    steps = ring_reduce_scatter_schedule(rank, nranks) + ring_allgather_schedule(rank, nranks)
    return _program(steps, steps)


def ring_reduce_scatter_program(rank, nranks, rotate=0):
    """send, N-2 recv_reduce_send, recv_reduce_copy: afterwards ``rank`` holds its owned chunk reduced."""
    if nranks == 1:
        return []
    steps = ring_reduce_scatter_schedule(rank, nranks, rotate)
    return _program(steps, steps)


def ring_allgather_program(rank, nranks, rotate=0):
    """send, N-2 recv_copy_send, recv: every rank ends with every owner's chunk."""
    if nranks == 1:
        return []
    steps = ring_allgather_schedule(rank, nranks, rotate)
    return _program(steps, steps)


def program_steps(program):
    """The program as host sendrecv steps: (primitive whose send goes out, primitive whose receive comes in)."""
    return list(zip(program, program[1:]))
