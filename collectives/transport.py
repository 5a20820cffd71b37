"""MPI transport: moves bytes between ranks with mpi4py, on host (NumPy) buffers."""
# Every wait is bounded: a peer that dies or stalls raises CollectiveTimeout naming it, instead of
# hanging the job (by default the job is then aborted: see faults.py). Payloads travel as raw bytes,
# so any dtype (bfloat16, fp8) crosses unchanged.

import os
import time

import numpy as np
from mpi4py import MPI

from ringlab import settings
from ringlab.errors import CollectiveTimeout, default_timeout, resolve_timeout
from ringlab.faults import handle_timeout

__all__ = ["MpiTransport", "CudaAwareMpiTransport", "wait_all", "env_unset", "default_seconds"]

_UNSET = object()
try:       # os.environ's own mapping (CPython): os.environ.get costs ~1 us a call for an unset name
    _ENV, _ENV_KEY = os.environ._data, os.environ.encodekey
except AttributeError:
    _ENV = None


def env_unset(name):
    """True when ``$name`` is certainly not set (read each call, as settings.get does; False: ask settings)."""
    if _ENV is None:
        return False
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = _ENV_KEY(name)
    return key not in _ENV


_ENV_KEYS = {}


def default_seconds():
    """errors.default_timeout() ($RINGLAB_TIMEOUT, parsed and checked), without the environment read when unset."""
    return settings.SETTINGS["RINGLAB_TIMEOUT"].default if env_unset("RINGLAB_TIMEOUT") else default_timeout()


def _as_bytes(a):
    if type(a) is np.ndarray and a.dtype.isbuiltin == 1:    # NumPy's own dtypes export a buffer as they are
        return [a, MPI.BYTE]
    return [a.reshape(-1).view(np.uint8), MPI.BYTE]         # bfloat16, fp8 (ml_dtypes), CuPy


def _local_ranks():
    """Ranks on this node, from the launcher's environment (hydra, Open MPI), else None."""
    for name in ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return None


def _spin_seconds():
    # Busy-poll this long before yielding: a yield on a loaded machine can cost a whole time slice per
    # message (a 64 KB all-reduce took 3.5x MPI's Allreduce). Oversubscribed (more ranks than cores), yield at once.
    local = _local_ranks()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return SPIN_S if local is not None and local <= cores else 0.0


SPIN_S = 100e-6
_spin = None
_testall = MPI.Request.Testall


def wait_all(requests, timeout, describe):
    """Complete ``requests`` or, after ``timeout`` seconds (None: no limit), apply the timeout
    policy (``faults.handle_timeout``: abort by default) and raise CollectiveTimeout.

    Polls with Testall: busy for up to SPIN_S when every rank of the node has a core, then yielding
    the CPU between polls, which keeps oversubscribed runs (8 ranks on 2 cores) moving.
    ``describe() -> (text, peer)`` builds the error only when needed.
    """
    global _spin
    if timeout is None:
        MPI.Request.Waitall(requests)
        return
    if MPI.Request.Testall(requests):
        return
    if _spin is None:
        _spin = _spin_seconds()
    if _spin:
        busy_until = time.perf_counter() + _spin
        while time.perf_counter() < busy_until:
            if MPI.Request.Testall(requests):
                return
    deadline = time.monotonic() + timeout
    spins = 0
    while not MPI.Request.Testall(requests):
        spins += 1
        if spins & 63 == 0 and time.monotonic() > deadline:
            text, peer = describe()
            exc = CollectiveTimeout(f"{text} (no progress within {timeout:g} s; "
                                    "set RINGLAB_TIMEOUT or timeout= to change)",
                                    peer=peer, rank=MPI.COMM_WORLD.rank)
            handle_timeout(exc)
            raise exc
        os.sched_yield()


class MpiTransport:
    """Point-to-point byte transfers on a communicator, each bounded by ``timeout`` seconds."""

    name = "mpi"

    def __init__(self, comm=None, timeout=_UNSET, tag=7):
        """``timeout``: seconds per wait; unset: $RINGLAB_TIMEOUT; None, 0 or inf: no limit."""
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        if timeout is _UNSET:
            self.timeout = default_seconds()
        else:
            self.timeout = None if timeout is None else resolve_timeout(timeout)
        self.tag = tag
        self.rank, self.size = self.comm.rank, self.comm.size

    def sendrecv(self, sendbuf, dest, recvbuf, source, what=""):
        """Send ``sendbuf`` to ``dest`` while receiving ``recvbuf`` from ``source``."""
        comm, tag = self.comm, self.tag
        reqs = [comm.Irecv(_as_bytes(recvbuf), source, tag), comm.Isend(_as_bytes(sendbuf), dest, tag)]
        if _testall(reqs):
            return

        def describe():
            # The receive pending means the left neighbour never sent; else the right one never took ours.
            peer = source if not reqs[0].Test() else dest
            return (f"rank {comm.rank}: peer rank {peer} did not "
                    f"{'send' if peer == source else 'receive'}{' during ' + what if what else ''} "
                    "(it died, stalled, or is not in this collective)", peer)
        wait_all(reqs, self.timeout, describe)


class CudaAwareMpiTransport(MpiTransport):
    """MpiTransport on device buffers for a CUDA-aware MPI: the stream is drained before MPI reads."""

    name = "mpi-cuda"

    def sendrecv(self, sendbuf, dest, recvbuf, source, what=""):
        import cupy
        cupy.cuda.get_current_stream().synchronize()
        super().sendrecv(sendbuf, dest, recvbuf, source, what)
