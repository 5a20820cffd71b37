"""Data-parallel inference (the DP-inference notes): model replicas on ranks 1..W serve a request stream that rank 0 routes."""
# Replicas never talk to each other (inference DP needs no all-reduce); the only decision is routing:
#
#     round_robin           request i -> replica i mod W
#     least_loaded          fewest requests outstanding (seed's "least connections"); ties rotate
#     response_time_aware   smallest predicted finish time: (queued work + this request's size) x the
#                           replica's observed seconds per unit of work (EWMA of its reported service times)
#
# A request of size k costs k units of real NumPy work (a fixed matmul loop), so service time is
# proportional to size. Replica speeds may differ (``slowdown``), as when one GPU is shared or older:
# round robin ignores that, least-loaded sees it only through queue lengths, response-time aware learns it.
# Ranks wait by polling with short sleeps, not in blocking MPI calls, so idle ranks leave the CPU to busy ones.

import os
import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

__all__ = ["Workload", "make_workload", "Router", "POLICIES", "serve", "summarize", "unit_of_work", "calibrate_unit",
           "polling_barrier"]

TAG_REQUEST, TAG_DONE, TAG_STOP = 21, 22, 23
POLICIES = ("round_robin", "least_loaded", "response_time_aware")
_UNIT = np.random.default_rng(0).standard_normal((48, 48))


def unit_of_work(units, reps=64):
    """``units`` x ``reps`` small matmuls: real compute whose time is proportional to ``units``."""
    acc = _UNIT
    for _ in range(int(units) * reps):
        acc = np.tanh(acc @ _UNIT)
    return float(acc[0, 0])


def calibrate_unit(reps=64, trials=20):
    """Median seconds one unit of work takes on this rank (measured with nothing else running)."""
    times = []
    for _ in range(trials):
        t0 = time.perf_counter()
        unit_of_work(1, reps)
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def polling_barrier(comm, pause=2e-4):
    """A barrier that sleeps between tests, so waiting ranks do not spin on the CPU."""
    req = comm.Ibarrier()
    while not req.Test():
        time.sleep(pause)


@dataclass
class Workload:
    arrivals: np.ndarray   # seconds after start
    sizes: np.ndarray      # units of work


def make_workload(n_requests, rate, mix=((1, 0.7), (4, 0.2), (32, 0.1)), seed=0):
    """Poisson arrivals at ``rate`` requests/s; sizes drawn from a skewed mix (many small, few large)."""
    rng = np.random.default_rng(seed)
    sizes, probs = zip(*mix)
    if abs(sum(probs) - 1) > 1e-9:
        raise ValueError(f"request mix probabilities must sum to 1, got {sum(probs)}")
    return Workload(np.cumsum(rng.exponential(1 / rate, n_requests)),
                    rng.choice(np.array(sizes), size=n_requests, p=np.array(probs)))


def mean_size(mix):
    return sum(s * p for s, p in mix)


@dataclass
class Router:
    """Routing state on rank 0: per replica, requests and work outstanding, and observed seconds per unit."""
    policy: str
    replicas: int
    outstanding: list = field(default_factory=list)
    queued_work: list = field(default_factory=list)
    sec_per_unit: list = field(default_factory=list)
    counter: int = 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown routing policy {self.policy!r}; expected one of {', '.join(POLICIES)}")
        if self.replicas < 1:
            raise ValueError("data-parallel inference needs at least one replica (run with N >= 2 ranks)")
        self.outstanding = [0] * self.replicas
        self.queued_work = [0] * self.replicas
        self.sec_per_unit = [None] * self.replicas

    def pick(self, size):
        """Replica index (0-based) for a request of ``size`` units."""
        w, start = self.replicas, self.counter % self.replicas
        self.counter += 1
        order = [(start + i) % w for i in range(w)]   # rotating start breaks ties fairly
        if self.policy == "round_robin":
            return start
        if self.policy == "least_loaded":
            return min(order, key=lambda i: self.outstanding[i])
        known = [s for s in self.sec_per_unit if s is not None]
        default = float(np.mean(known)) if known else 1.0     # unseen replicas: assume average speed
        return min(order, key=lambda i: (self.queued_work[i] + size) *
                   (self.sec_per_unit[i] if self.sec_per_unit[i] is not None else default))

    def assigned(self, i, size):
        self.outstanding[i] += 1
        self.queued_work[i] += size

    def finished(self, i, size, service_s, alpha=0.3):
        self.outstanding[i] -= 1
        self.queued_work[i] -= size
        per_unit = service_s / max(size, 1)
        old = self.sec_per_unit[i]
        self.sec_per_unit[i] = per_unit if old is None else (1 - alpha) * old + alpha * per_unit


def _route(comm, policy, workload, deadline_s, pause):
    """Rank 0: release requests at their arrival times, route them, collect completions."""
    router = Router(policy, comm.size - 1)
    n = len(workload.sizes)
    latency = np.full(n, np.nan)
    where = np.full(n, -1)
    sends, nxt, done = [], 0, 0
    t0 = time.perf_counter()
    status = MPI.Status()
    while done < n:
        now = time.perf_counter() - t0
        if now > deadline_s:
            break
        while nxt < n and workload.arrivals[nxt] <= now:
            size = int(workload.sizes[nxt])
            i = router.pick(size)
            router.assigned(i, size)
            where[nxt] = i
            sends.append(comm.isend((nxt, size), dest=i + 1, tag=TAG_REQUEST))
            nxt += 1
        got = False
        while comm.Iprobe(source=MPI.ANY_SOURCE, tag=TAG_DONE, status=status):
            rid, service_s = comm.recv(source=status.Get_source(), tag=TAG_DONE)
            latency[rid] = time.perf_counter() - t0 - workload.arrivals[rid]
            router.finished(status.Get_source() - 1, int(workload.sizes[rid]), service_s)
            done, got = done + 1, True
        if not got:
            time.sleep(pause)
    makespan = time.perf_counter() - t0
    for w in range(1, comm.size):
        sends.append(comm.isend(None, dest=w, tag=TAG_STOP))
    MPI.Request.waitall(sends)
    return latency, where, makespan


def _replica(comm, slowdown, reps, pause, deadline_s):
    """Ranks 1..W: FIFO queue of requests; each costs size x slowdown units of real work."""
    queue, status, t0 = [], MPI.Status(), time.perf_counter()
    while True:
        while comm.Iprobe(source=0, tag=MPI.ANY_TAG, status=status):
            msg = comm.recv(source=0, tag=status.Get_tag())
            if status.Get_tag() == TAG_STOP:
                # STOP comes after every request the router sent, so anything still queued is abandoned
                return len(queue)
            queue.append(msg)
        if queue:
            rid, size = queue.pop(0)
            start = time.perf_counter()
            unit_of_work(size * slowdown, reps)
            comm.send((rid, time.perf_counter() - start), dest=0, tag=TAG_DONE)
        else:
            if time.perf_counter() - t0 > deadline_s + 30:
                raise RuntimeError(f"replica rank {comm.rank}: no stop message from the router rank 0")
            time.sleep(pause)


def serve(comm, policy, workload, slowdowns, reps=64, deadline_s=30.0, pause=2e-4):
    """Run one policy over ``workload`` on ``comm`` (rank 0 routes, ranks 1.. are replicas).

    Returns (latency s per request or NaN if unfinished, replica index per request, makespan s) on
    rank 0, None elsewhere. ``slowdowns[i]`` scales replica i's work. Bounded by ``deadline_s``.
    """
    polling_barrier(comm, pause)
    if comm.rank == 0:
        out = _route(comm, policy, workload, deadline_s, pause)
    else:
        _replica(comm, slowdowns[comm.rank - 1], reps, pause, deadline_s)
        out = None
    polling_barrier(comm, pause)
    return out


def summarize(policy, latency, where, makespan, replicas):
    """Throughput and latency percentiles of one run (unfinished requests are counted, not hidden)."""
    ok = ~np.isnan(latency)
    lat_ms = latency[ok] * 1e3
    return {"policy": policy, "requests": int(len(latency)), "completed": int(ok.sum()),
            "throughput_rps": float(ok.sum() / makespan) if makespan > 0 else 0.0,
            "p50_ms": float(np.percentile(lat_ms, 50)) if lat_ms.size else float("nan"),
            "p99_ms": float(np.percentile(lat_ms, 99)) if lat_ms.size else float("nan"),
            "mean_ms": float(lat_ms.mean()) if lat_ms.size else float("nan"),
            "makespan_s": float(makespan),
            "per_replica": [int((where == i).sum()) for i in range(replicas)]}


def effective_parallelism(replicas):
    """How many replicas can compute at once here: cores, not ranks, bound CPU replicas."""
    return min(replicas, max(1, (os.cpu_count() or 1)))
