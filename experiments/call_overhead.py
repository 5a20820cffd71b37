"""Per-call cost of ringlab's all-reduce against the MPI library's own Allreduce, measured side by side.

    mpirun -n 2 python experiments/call_overhead.py                   # 64K and 16M, validated calls
    mpirun -n 2 python experiments/call_overhead.py --sizes 4K,64K,1M,16M,64M --rounds 200 --out results.txt
    mpirun -n 2 python experiments/call_overhead.py --runs 3 --json docs/results/overhead/call_overhead_n2_cpu.json

Each round times one call of every variant in turn, in an order that rotates from round to round
(barrier-aligned, so load on a shared machine hits all variants alike); the table reports medians
and the ratio to MPI's Allreduce.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ringlab  # noqa: E402
from ringlab.bench.harness import size_list_arg  # noqa: E402
from ringlab.bench.tuner import tuning_path  # noqa: E402


def variants(comm, x, y, z):
    return {
        "mpi Allreduce": lambda: comm.Allreduce(x, y, op=MPI.SUM),
        "ring": lambda: ringlab.allreduce(x, out=y, comm=comm),
        "ring validate=False": lambda: ringlab.allreduce(x, out=y, comm=comm, validate=False),
        "auto": lambda: ringlab.allreduce(x, out=y, algo="auto", comm=comm),
        "recursive_doubling": lambda: ringlab.allreduce(x, out=y, algo="recursive_doubling", comm=comm),
        "ring in place, max": lambda: ringlab.allreduce(z, out=z, op="max", comm=comm),   # max: z stays finite
    }


def median_us(comm, fn, rounds):
    times = []
    for _ in range(rounds):
        comm.Barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    local = np.median(times) * 1e6
    return comm.allreduce(local, op=MPI.MAX)     # the slowest rank's median: a collective ends when all do


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=size_list_arg, default="64K,16M", help="message sizes; default %(default)s")
    p.add_argument("--rounds", type=int, default=300, help="timed rounds at the smallest size; default %(default)s")
    p.add_argument("--min-rounds", type=int, default=30, help="timed rounds at the largest sizes; default %(default)s")
    p.add_argument("--runs", type=int, default=1, help="measure everything this many times; default %(default)s")
    p.add_argument("--out", help="also write the table to this file")
    p.add_argument("--json", help="also write every run's medians and ratios to this JSON file")
    args = p.parse_args(argv)
    comm = MPI.COMM_WORLD
    lines = [f"# {comm.size} ranks, {MPI.Get_library_version().splitlines()[0].strip()}; "
             f"tuning file {'present' if os.path.exists(tuning_path()) else 'absent'} ({tuning_path()})"]
    runs = []
    for run in range(args.runs):
        lines.append(f"# run {run + 1} of {args.runs}, {time.strftime('%H:%M:%S', time.gmtime())} UTC, load average "
                     f"{os.getloadavg()[0]:.2f}")
        lines.append(f"{'bytes':>10} {'variant':>22} {'median_us':>11} {'x mpi':>7}")
        runs.append(measure(comm, args, lines))
    command = f"mpirun -n {comm.size} python experiments/call_overhead.py {' '.join(argv or sys.argv[1:])}"
    if comm.rank == 0:
        text = "\n".join(lines)
        print(text, flush=True)
        if args.out:
            with open(args.out, "w") as f:
                f.write(f"$ {command}\n{text}\n")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"command": command, "ranks": comm.size, "mpi": MPI.Get_library_version().splitlines()[0].strip(),
                           "tuning_file": os.path.exists(tuning_path()), "date_utc": time.strftime("%Y-%m-%d %H:%M"),
                           "runs": runs}, f, indent=1)
                f.write("\n")


def measure(comm, args, lines):
    """One pass over every size: {bytes: {variant: {"median_us", "x_mpi"}}}, rows appended to ``lines``."""
    result = {}
    for nbytes in args.sizes:
        x = np.ones(nbytes // 4, np.float32)
        y = np.empty_like(x)
        rounds = max(args.min_rounds, min(args.rounds, int(args.rounds * 65536 / max(nbytes, 65536))))
        vs = variants(comm, x, y, x.copy())
        for fn in vs.values():   # warm-up: scratch buffers, the tuner's table, the async dup
            for _ in range(5):
                fn()
        # interleave: every round runs each variant once, so machine noise hits them alike; the order rotates
        # every round, so no variant always follows the same one (the one after MPI's own call ran slower)
        samples = {name: [] for name in vs}
        order = list(vs.items())
        for i in range(rounds):
            for name, fn in order[i % len(order):] + order[:i % len(order)]:
                comm.Barrier()
                t0 = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - t0)
        medians = {name: comm.allreduce(float(np.median(t)) * 1e6, op=MPI.MAX) for name, t in samples.items()}
        base = medians["mpi Allreduce"]
        for name, us in medians.items():
            lines.append(f"{nbytes:>10} {name:>22} {us:>11.1f} {us / base:>7.2f}")
        result[str(nbytes)] = {name: {"median_us": round(us, 2), "x_mpi": round(us / base, 3)}
                               for name, us in medians.items()}
    return result


if __name__ == "__main__":
    main()
