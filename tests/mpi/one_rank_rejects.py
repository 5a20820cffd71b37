"""An argument that only one rank rejects goes through the agreement: every rank raises the same
InvalidCollectiveCall at once, and the next collective is exact (no call pairs with a later one).

    one_rank_rejects.py           the cases below, the odd rank moving with the case
    one_rank_rejects.py --same    the same bad call on every rank: its error once, not "inconsistently"
"""
import sys
import time

import numpy as np
from mpi4py import MPI

import ringlab
from ringlab.bench.harness import pattern, reference

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank
COUNT = 37


def ones():
    return np.ones(COUNT, np.float32)


def read_only():
    out = np.empty(COUNT, np.float32)
    out.flags.writeable = False
    return out


# name -> (call(odd), substrings of the message)
CASES = {
    "list-input": (lambda odd: ringlab.allreduce([1.0] * COUNT if odd else ones()), ["cannot use list as a buffer"]),
    "read-only-out": (lambda odd: ringlab.allreduce(ones(), out=read_only() if odd else None), ["out is read-only"]),
    "nan-timeout": (lambda odd: ringlab.allreduce(ones(), timeout=float("nan") if odd else 30), ["timeout must be"]),
    "negative-timeout": (lambda odd: ringlab.allreduce(ones(), timeout=-1 if odd else 30), ["timeout must be"]),
    "text-timeout": (lambda odd: ringlab.allreduce(ones(), timeout="soon" if odd else 30), ["'soon'"]),
    "bad-transport": (lambda odd: ringlab.allreduce(ones(), transport="nvlink" if odd else None),
                      ["unknown transport 'nvlink'"]),
    "list-reduce-scatter": (lambda odd: ringlab.reduce_scatter([1.0] * COUNT if odd else ones()), ["list"]),
    "list-allgather": (lambda odd: ringlab.allgather([1.0] * COUNT if odd else ones()), ["list"]),
    "list-fp8": (lambda odd: ringlab.allreduce_fp8([1.0] * COUNT if odd else ones()), ["list"]),
    "fp8-vs-plain": (lambda odd: (ringlab.allreduce_fp8 if odd else ringlab.allreduce)(ones()),
                     ["allreduce / allreduce_fp8 called inconsistently", "'allreduce_fp8' on rank {odd}"]),
    "list-async": (lambda odd: ringlab.allreduce_async([1.0] * COUNT if odd else ones()).wait(), ["list"]),
    "big-endian": (lambda odd: ringlab.allreduce(ones().astype(">f4") if odd else ones()), ["big-endian"]),
}

SAME = {  # every rank makes this call: the message says what is wrong, once
    "int8": (lambda: ringlab.allreduce(np.ones(4, np.int8)), "allreduce: TypeError: unsupported dtype int8"),
    "op": (lambda: ringlab.allreduce(ones(), op="mean"), "allreduce: ValueError: unknown op 'mean'"),
    "int-avg": (lambda: ringlab.allreduce(np.ones(4, np.int32), op="avg"), "allreduce: TypeError: op 'avg' needs"),
    "big-endian": (lambda: ringlab.allreduce(ones().astype(">f4")), "float32 (big-endian, >f4)"),
}


def exact_allreduce_follows():
    x = pattern(COUNT, "float32", rank)
    assert np.array_equal(ringlab.allreduce(x).astype(np.float64), reference(COUNT, n)), f"rank {rank}: corrupted"


def raised(call):
    try:
        call()
    except ringlab.InvalidCollectiveCall as exc:
        return str(exc)
    return None


def run_cases():
    for i, (name, (call, expected)) in enumerate(CASES.items()):
        odd = i % n
        t0 = time.monotonic()
        message = raised(lambda: call(rank == odd))
        took = time.monotonic() - t0
        assert message is not None, f"rank {rank}: case {name}: no error"
        assert took < 10, f"case {name}: took {took:.1f} s (waited for a timeout?)"
        messages = comm.allgather(message)
        assert all(m == messages[0] for m in messages), f"case {name}: ranks differ: {messages}"
        for text in (t.format(odd=odd) for t in expected):
            assert text in message, f"case {name}: {text!r} not in {message!r}"
        exact_allreduce_follows()
        if rank == 0:
            print(f"case {name} (odd rank {odd}): {message}", flush=True)
    if rank == 0:
        print(f"one-rank cases ok: {len(CASES)} on {n} ranks", flush=True)


def run_same():
    for name, (call, expected) in SAME.items():
        message = raised(call)
        assert message is not None and expected in message, f"case {name}: {message!r}"
        assert "inconsistently" not in message and message.count(expected) == 1, f"case {name}: {message!r}"
        assert f"rank {rank}" not in message and "ranks 0" not in message, f"case {name}: {message!r}"
        exact_allreduce_follows()
        if rank == 0:
            print(f"same-call {name}: {message}", flush=True)
    if rank == 0:
        print(f"same-call cases ok: {len(SAME)} on {n} ranks", flush=True)


if __name__ == "__main__":
    run_same() if "--same" in sys.argv else run_cases()
