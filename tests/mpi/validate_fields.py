"""Each validated field disagreeing on one rank: every rank raises the same clear error, nobody hangs.

    validate_fields.py            all mismatch cases, then a correct all-reduce after each
    validate_fields.py --off      RINGLAB_VALIDATE=0 / validate=False: no exchange happens at all

The odd rank moves with the case (case index mod N), so first, middle and last ranks all get a turn.
"""
import sys

import numpy as np
from mpi4py import MPI

import ringlab
from ringlab import validate as validate_module
from ringlab.api import ALLREDUCE_ALGORITHMS, register_allreduce
from ringlab.bench.harness import pattern, reference

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank
COUNT = 101  # odd and not divisible by 3 or 4
register_allreduce("ring-alias", ALLREDUCE_ALGORITHMS["ring"])


def f32(count=COUNT, dtype=np.float32):
    return np.ones(count, dtype=dtype)


# name -> (call(odd: bool), substrings the message must contain, with {odd} = the odd rank)
CASES = {
    "count": (lambda odd: ringlab.allreduce(f32(COUNT + odd)),
              ["count differs across ranks", "102 on rank {odd}"]),
    "dtype": (lambda odd: ringlab.allreduce(f32(dtype=np.float64 if odd else np.float32)),
              ["dtype differs across ranks", "'float64' on rank {odd}"]),
    "bad-dtype": (lambda odd: ringlab.allreduce(f32(dtype=np.complex64 if odd else np.float32)),
                  ["rank {odd}: TypeError: unsupported dtype complex64", "'complex64' on rank {odd}"]),
    "op": (lambda odd: ringlab.allreduce(f32(), op="max" if odd else "sum"),
           ["op differs across ranks", "'max' on rank {odd}"]),
    "bad-op": (lambda odd: ringlab.allreduce(f32(), op="xor" if odd else "sum"),
               ["rank {odd}: ValueError: unknown op 'xor'"]),
    "int-avg": (lambda odd: ringlab.allreduce(f32(dtype=np.int32), op="avg" if odd else "sum"),
                ["rank {odd}: TypeError: op 'avg' needs a floating dtype"]),
    "algo": (lambda odd: ringlab.allreduce(f32(), algo="ring-alias" if odd else "ring"),
             ["algo differs across ranks", "'ring-alias' on rank {odd}"]),
    "unknown-algo": (lambda odd: ringlab.allreduce(f32(), algo="nope" if odd else "ring"),
                     ["rank {odd}: ValueError: unknown algo 'nope'"]),
    "inplace": (lambda odd: (lambda x: ringlab.allreduce(x, out=x if odd else None))(f32()),
                ["inplace differs across ranks", "True on rank {odd}"]),
    "collective": (lambda odd: (ringlab.reduce_scatter if odd else ringlab.allreduce)(f32()),
                   ["allreduce / reduce_scatter called inconsistently", "collective differs across ranks",
                    "'reduce_scatter' on rank {odd}"]),
    "out-shape": (lambda odd: ringlab.allreduce(f32(), out=np.empty(COUNT - odd, np.float32)),
                  ["rank {odd}: ValueError: allreduce: out has shape (100,)"]),
    "allgather-count": (lambda odd: ringlab.allgather(f32(7 + 2 * odd)),
                        ["allgather called inconsistently", "9 on rank {odd}"]),
    "reduce-scatter-op": (lambda odd: ringlab.reduce_scatter(f32(), op="min" if odd else "sum"),
                          ["reduce_scatter called inconsistently", "'min' on rank {odd}"]),
}


def check_correct_allreduce_still_works():
    """After an InvalidCollectiveCall nothing is left in flight: the next collective is exact."""
    x = pattern(COUNT, "float32", rank)
    y = ringlab.allreduce(x)
    assert np.array_equal(y.astype(np.float64), reference(COUNT, n)), f"rank {rank}: corrupted after mismatch"


def run_mismatch_cases():
    for i, (name, (call, expected)) in enumerate(CASES.items()):
        odd_rank = i % n
        message = None
        try:
            call(rank == odd_rank)
        except ringlab.InvalidCollectiveCall as exc:
            message = str(exc)
        assert message is not None, f"rank {rank}: case {name}: no error raised"
        messages = comm.allgather(message)
        assert all(m == messages[0] for m in messages), f"case {name}: ranks got different messages: {messages}"
        for text in (t.format(odd=odd_rank) for t in expected):
            assert text in message, f"case {name}: {text!r} not in {message!r}"
        check_correct_allreduce_still_works()
        if rank == 0:
            print(f"case {name} (odd rank {odd_rank}): {message}", flush=True)
    if rank == 0:
        print(f"validate cases ok: {len(CASES)} on {n} ranks", flush=True)


def run_validation_off():
    """RINGLAB_VALIDATE=0 (set by the caller) and validate=False both skip the exchange entirely."""
    def no_exchange(*args, **kwargs):
        raise AssertionError("validation exchange ran although validation is off")
    validate_module._bounded_allgather = no_exchange
    x = pattern(COUNT, "float32", rank)
    assert np.array_equal(ringlab.allreduce(x, validate=False).astype(np.float64), reference(COUNT, n))
    assert np.array_equal(ringlab.allreduce(x).astype(np.float64), reference(COUNT, n))
    # A locally bad call (on every rank) still raises, locally, without any communication.
    try:
        ringlab.allreduce(f32(dtype=np.complex64))
    except ringlab.InvalidCollectiveCall as exc:
        assert "unsupported dtype complex64" in str(exc)
    else:
        raise AssertionError("bad dtype accepted with validation off")
    comm.Barrier()
    if rank == 0:
        print("validation off ok", flush=True)


if __name__ == "__main__":
    if "--off" in sys.argv:
        run_validation_off()
    else:
        run_mismatch_cases()
