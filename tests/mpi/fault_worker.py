"""Fault scenarios for tests/test_faults.py and experiments/fault_drill.py (run under mpirun).

    fault_worker.py SCENARIO [--victim R] [--calls K] [--count C] [--timeout S]

Scenarios:
  ring        every rank runs K verified all-reduces; RINGLAB_FAULT (set by the caller) injects
              kill/stall/exit/raise inside the ring on one rank
  skip        the victim never calls the all-reduce (validation on): the others wait in the
              validation exchange until the timeout
  skip-noval  the same with validate=False: the others wait in the ring until the timeout
  die-before  the victim SIGKILLs itself just before calling the all-reduce
  raise-mode  like ring, but survivors catch CollectiveTimeout (run with RINGLAB_ABORT_ON_TIMEOUT=0),
              print it and leave with exit code 3 via MPI_Abort

Every completed all-reduce is checked against a float64 reference: "rank R verified call K" or
"rank R WRONG call K" (corruption), so a caller can count both.
"""
import argparse
import os
import signal
import sys
import time

import numpy as np
from mpi4py import MPI

import ringlab
from ringlab.bench.harness import pattern, reference

p = argparse.ArgumentParser()
p.add_argument("scenario", choices=["ring", "skip", "skip-noval", "die-before", "raise-mode"])
p.add_argument("--victim", type=int, default=2)
p.add_argument("--calls", type=int, default=3)
p.add_argument("--count", type=int, default=4099)
p.add_argument("--timeout", type=float, default=None, help="timeout= argument (default: $RINGLAB_TIMEOUT)")
args = p.parse_args()

comm = MPI.COMM_WORLD
rank = comm.rank
x = pattern(args.count, "float32", rank)
ref = reference(args.count, comm.size)
validate = args.scenario != "skip-noval"
comm.Barrier()  # line the ranks up, so slow interpreter start-up is not mistaken for a stall
start = time.monotonic()


def log(text):
    print(f"rank {rank} {text} t={time.monotonic() - start:.2f}", flush=True)


for call in range(args.calls):
    is_victim = rank == args.victim and call == args.calls - 1
    if is_victim and args.scenario in ("skip", "skip-noval"):
        log(f"skips call {call}")
        time.sleep(3600)  # stays alive and silent, like a rank stuck elsewhere in the program
    if is_victim and args.scenario == "die-before":
        log(f"dies before call {call}")
        os.kill(os.getpid(), signal.SIGKILL)
    try:
        y = ringlab.allreduce(x, timeout=args.timeout, validate=validate)
    except ringlab.CollectiveTimeout as exc:
        if args.scenario != "raise-mode":
            raise
        log(f"caught CollectiveTimeout peer={exc.peer}: {exc}")
        sys.stderr.write(f"rank {rank} caught CollectiveTimeout: {exc}\n")
        sys.stderr.flush()
        time.sleep(1.0)  # let the other survivors print theirs before the job goes down
        comm.Abort(3)
        os._exit(3)  # MPICH's MPI_Abort can return while the launcher tears the job down
    wrong = int((y.astype(np.float64) != ref).sum())
    log(f"{'verified' if wrong == 0 else 'WRONG'} call {call}" + (f" ({wrong} elements)" if wrong else ""))
    if wrong:
        sys.exit(1)
log("done")
