"""Two threads issuing async all-reduces on one communicator: every result is right or an error, never wrong.

Each thread sums its own data (thread t of rank r contributes (t + 1) * 1000 + r + call), with jitter
so the ranks interleave the two threads differently. Validation compares the issuing thread and its
call number: calls that pair across threads (or out of order) raise InvalidCollectiveCall on every
rank. Prints "threads: R right, E errors, W wrong"; then the remedy the error names, one communicator
per thread, prints "own comms: ..." with every result right.
"""
import random
import threading
import time

import numpy as np
from mpi4py import MPI

import ringlab

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank
CALLS, COUNT = 50, 64
ringlab.allreduce_async(np.zeros(1)).wait()   # the private duplicate exists before the threads start
results = {"right": 0, "errors": 0, "wrong": 0, "texts": set()}
lock = threading.Lock()
start = threading.Barrier(2)


def worker(t, comm_of_thread=None):
    rng = random.Random(rank * 7 + t)
    start.wait()
    works = []
    for call in range(CALLS):
        x = np.full(COUNT, (t + 1) * 1000 + rank + call, dtype=np.float64)
        works.append((call, ringlab.allreduce_async(x, comm=comm_of_thread)))
        time.sleep(rng.random() * 0.002)
    for call, w in works:
        want = sum((t + 1) * 1000 + r + call for r in range(n))
        try:
            y = w.wait(timeout=120)
        except ringlab.InvalidCollectiveCall as exc:
            with lock:
                results["errors"] += 1
                results["texts"].add(str(exc).split(" (")[0][:200])
            continue
        with lock:
            results["right" if np.all(y == want) else "wrong"] += 1


def run(label, comms):
    for key in ("right", "errors", "wrong"):
        results[key] = 0
    threads = [threading.Thread(target=worker, args=(t, comms[t]), name=f"worker-{t}") for t in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    total = comm.allreduce(np.array([results["right"], results["errors"], results["wrong"]]))
    y = ringlab.allreduce(np.full(5, rank, dtype=np.float64))   # the blocking path is unaffected
    assert np.all(y == sum(range(n)))
    if rank == 0:
        print(f"{label}: {total[0]} right, {total[1]} errors, {total[2]} wrong (of {2 * CALLS * n})", flush=True)


run("threads", [None, None])
if rank == 0:
    for text in sorted(results["texts"])[:3]:
        print("error:", text, flush=True)
own = [comm.Dup(), comm.Dup()]
for c in own:
    ringlab.allreduce_async(np.zeros(1), comm=c).wait()
run("own comms", own)
