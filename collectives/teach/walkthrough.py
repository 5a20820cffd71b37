"""The ring, step by step, recorded from a real run (the ring derivation's a, b, c, d tables)."""
# Rank r contributes the value 2**r to every element, so a held value decodes to the set of ranks
# whose addends it contains: 9 = 0b1001 is a + d. Element values are checked by eye and by code.

from dataclasses import dataclass

import numpy as np

from ringlab.ring import ring_allgather_inplace, ring_reduce_scatter_inplace
from ringlab.schedule import chunk_bounds
from ringlab.transport import MpiTransport

__all__ = ["StepRecord", "record_ring_allreduce", "rank_letter", "symbolic", "format_walkthrough"]


@dataclass
class StepRecord:
    phase: str
    step: int
    rank: int
    send_to: int
    send_chunk: int
    sent: int          # value of the sent chunk (first element)
    recv_from: int
    recv_chunk: int
    holds: list        # value of each chunk (first element) after the step


def rank_letter(r):
    return "abcdefghijklmnopqrstuvwxyz"[r] if r < 26 else f"r{r}"


def symbolic(value, chunk):
    """9, chunk 3 -> 'a3+d3': the ranks whose addends the value holds."""
    value = int(value)
    terms = [f"{rank_letter(k)}{chunk}" for k in range(value.bit_length()) if value >> k & 1]
    return "+".join(terms) if terms else "0"


def record_ring_allreduce(comm, per_chunk=1):
    """Run ring all-reduce on 2**rank data and return every rank's StepRecords on rank 0
    (None elsewhere), plus the final buffer (on every rank)."""
    n, r = comm.size, comm.rank
    if n > 62:
        raise ValueError("the walkthrough encodes ranks as bits of an int64: at most 62 ranks")
    buf = np.full(n * per_chunk, 1 << r, dtype=np.int64)
    bounds = chunk_bounds(buf.size, n)
    records = []

    def trace(st, b):
        first = [int(b[lo]) if hi > lo else 0 for lo, hi in bounds]
        records.append(StepRecord(st.phase, st.step, st.rank, st.send_to, st.send_chunk,
                                  first[st.send_chunk], st.recv_from, st.recv_chunk, first))
    tr = MpiTransport(comm)
    records.append(StepRecord("start", -1, r, -1, -1, 0, -1, -1, [int(buf[lo]) for lo, _ in bounds]))
    ring_reduce_scatter_inplace(buf, tr, "sum", trace=trace)
    ring_allgather_inplace(buf, tr, trace=trace)
    everyone = comm.gather(records, root=0)
    return everyone, buf


def format_walkthrough(everyone):
    """Text tables, one per step: what each rank sends, receives and holds afterwards."""
    n = len(everyone)
    out = []
    letters = [rank_letter(k) for k in range(n)]
    out.append(f"Ring all-reduce on N = {n} ranks ({', '.join(letters)}); rank r starts with chunks "
               f"{letters[0]}0..{letters[0]}{n - 1} = 2**r (so a sum's bits name its addends).")
    steps = len(everyone[0])
    cells = {}          # (step, rank) -> (sends, receives): built first, so the columns fit the widest (N = 8 too)
    for i in range(steps):
        for rec in (everyone[k][i] for k in range(n)):
            if rec.phase != "start":
                src = everyone[rec.recv_from][i]
                cells[i, rec.rank] = (f"{symbolic(rec.sent, rec.send_chunk)} (={rec.sent}) -> {letters[rec.send_to]}",
                                      f"{symbolic(src.sent, rec.recv_chunk)} (={src.sent}) <- {letters[rec.recv_from]}")
    width = max([28] + [len(c) + 2 for pair in cells.values() for c in pair])
    for i in range(steps):
        recs = [everyone[k][i] for k in range(n)]
        st = recs[0]
        if st.phase == "start":
            out.append("\nstart: every rank holds its own chunks")
        else:
            verb = "adds it" if st.phase == "reduce-scatter" else "overwrites its copy"
            out.append(f"\n{st.phase} step {st.step + 1} of {n - 1}: rank r sends one chunk to r+1, "
                       f"receives one from r-1 and {verb}")
            out.append(f"  {'rank':<5}{'sends':<{width}}{'receives':<{width}}")
        for rec in recs:
            holds = " | ".join(symbolic(v, c) for c, v in enumerate(rec.holds))
            if rec.phase == "start":
                out.append(f"  {letters[rec.rank]:<5}holds [{holds}]")
                continue
            send, recv = cells[i, rec.rank]
            out.append(f"  {letters[rec.rank]:<5}{send:<{width}}{recv:<{width}}holds [{holds}]")
    return "\n".join(out)
