"""Data-parallel inference (the DP-inference notes): rank 0 routes a skewed request stream to replicas on ranks 1..N-1.

    mpirun -n 5 python experiments/dp_inference.py                        # 4 replicas, one 3x slower
    mpirun -n 5 python experiments/dp_inference.py --requests 600 --load 0.8 --json dpi.json

The same workload (Poisson arrivals, 70% size 1 / 20% size 4 / 10% size 32 units of real NumPy work)
is served under each routing policy; the table gives throughput and p50/p99 latency. The arrival rate is
``--load`` times the replicas' nominal capacity, measured from one unit of work on rank 0 and capped by
the cores that can actually compute at once (CPU numbers; other jobs on the box add noise).
"""
import argparse
import json
import os
import sys

from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.teach import dp_inference as dpi  # noqa: E402
from ringlab.bench.harness import run_metadata  # noqa: E402

MIX = ((1, 0.7), (4, 0.2), (32, 0.1))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--load", type=float, default=0.7, help="arrival rate / nominal capacity; default %(default)s")
    p.add_argument("--slow-factor", type=float, default=3.0, help="work multiplier of the slow replicas")
    p.add_argument("--slow-replicas", type=int, default=1, help="how many replicas are slow (the first ones)")
    p.add_argument("--policies", default=",".join(dpi.POLICIES))
    p.add_argument("--deadline", type=float, default=30.0, help="seconds per policy before giving up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH")
    a = p.parse_args(argv)
    a.policies = [x for x in a.policies.split(",") if x]
    if a.requests < 1 or a.load <= 0 or a.slow_factor <= 0:
        p.error("--requests must be >= 1, --load and --slow-factor > 0")
    return a


def main(argv=None):
    a = parse_args(argv)
    comm = MPI.COMM_WORLD
    replicas = comm.size - 1
    if replicas < 1:
        raise SystemExit("dp_inference needs N >= 2 ranks: rank 0 routes, ranks 1.. are replicas")
    for policy in a.policies:
        dpi.Router(policy, replicas)   # unknown policy names fail here on every rank
    slowdowns = [a.slow_factor if i < a.slow_replicas else 1.0 for i in range(replicas)]
    unit_s = dpi.calibrate_unit() if comm.rank == 0 else None   # the others sleep in the barrier meanwhile
    dpi.polling_barrier(comm)
    unit_s = comm.bcast(unit_s)
    parallel = dpi.effective_parallelism(replicas)
    capacity_units = sum(1 / (unit_s * s) for s in slowdowns) * parallel / replicas
    rate = a.load * capacity_units / dpi.mean_size(MIX)
    workload = dpi.make_workload(a.requests, rate, MIX, seed=a.seed)
    say = print if comm.rank == 0 else (lambda *x, **k: None)
    say(f"DP inference (CPU): {replicas} replicas (slowdown {slowdowns}), {a.requests} requests, "
        f"mix {MIX}, unit = {unit_s * 1e3:.2f} ms, {parallel} replicas can compute at once on "
        f"{os.cpu_count()} cores, arrival rate {rate:.1f} req/s (load {a.load})")
    results = []
    for policy in a.policies:
        out = dpi.serve(comm, policy, workload, slowdowns, deadline_s=a.deadline)
        if comm.rank == 0:
            results.append(dpi.summarize(policy, *out, replicas))
    say(f"\n{'policy':>20s} {'done':>9s} {'thru (req/s)':>13s} {'p50 (ms)':>9s} {'p99 (ms)':>9s} "
        f"{'mean (ms)':>9s}  requests per replica")
    for r in results:
        say(f"{r['policy']:>20s} {r['completed']:>4d}/{r['requests']:<4d} {r['throughput_rps']:13.1f} "
            f"{r['p50_ms']:9.1f} {r['p99_ms']:9.1f} {r['mean_ms']:9.1f}  {r['per_replica']}")
    if comm.rank == 0 and a.json:
        with open(a.json, "w") as f:
            json.dump({"meta": run_metadata(comm, device="CPU", unit_ms=unit_s * 1e3, rate_rps=rate,
                                            slowdowns=slowdowns, mix=MIX), "results": results}, f, indent=1)
        print(f"wrote {a.json}")
    incomplete = comm.bcast(any(r["completed"] < r["requests"] for r in results) if comm.rank == 0 else None)
    if incomplete:
        say("WARNING: some requests did not finish within --deadline (counted as unfinished above)")
    return 1 if incomplete else 0


if __name__ == "__main__":
    sys.exit(main())
