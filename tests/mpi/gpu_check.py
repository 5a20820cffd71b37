"""MPI worker (GPU): the device transports against a float64 reference; exits non-zero on failure.

usage: gpu_check.py TRANSPORTS COUNTS    e.g. ipc,ipc:4,ipc-host,staged,oneshot 0,1,1009,100003
(oneshot and twoshot are algorithms over IPC rather than transports of the ring). Then the IPC executors
named there are also called directly, in their one call shape ``allreduce(src, out, op, timeout)``.
"""
import hashlib
import sys
import time

import cupy
import numpy as np
from mpi4py import MPI

from ringlab import allreduce
from ringlab.arrays import use_local_gpu
from ringlab.gpu.ipc import get_ipc_ring, ipc_usable
from ringlab.gpu.ipc_direct import get_ipc_direct

comm = MPI.COMM_WORLD
n, rank = comm.size, comm.rank
use_local_gpu(comm)
EPS = {"float16": 2 ** -11, "float32": 2 ** -24, "float64": 2 ** -53}
transports = sys.argv[1].split(",")
counts = [int(c) for c in sys.argv[2].split(",")]
cases = 0
for transport in transports:
    t_start = time.perf_counter()
    for count in counts:
        for dtype in ("float32", "float16", "float64", "int32", "int64"):
            for op in ("sum", "prod", "max", "min", "avg"):
                if op == "avg" and dtype.startswith("int"):
                    continue
                rngs = [np.random.default_rng([k, count, len(dtype), len(op)]) for k in range(n)]
                if dtype.startswith("int"):
                    inputs = [g.integers(-2, 3, count) if op == "prod" else g.integers(-999, 999, count) for g in rngs]
                else:
                    inputs = [g.uniform(0.5, 1.5, count) if op == "prod" else g.standard_normal(count) for g in rngs]
                inputs = [a.astype(dtype) for a in inputs]
                st = np.stack([a.astype(np.float64) for a in inputs]).reshape(n, count)
                ref = {"sum": st.sum(0), "avg": st.mean(0), "prod": st.prod(0), "max": st.max(0), "min": st.min(0)}[op]
                scale = np.abs(st).sum(0) / (n if op == "avg" else 1) if op in ("sum", "avg") else np.abs(ref)
                tol = 0.0 if op in ("max", "min") or dtype.startswith("int") else (n + 1) * EPS[dtype] * 1.1
                x = cupy.asarray(inputs[rank])
                for inplace in (False, True):
                    for rep in range(2):  # reuse the same buffers: cross-call ordering must hold
                        buf = x.copy() if inplace else x
                        how = {"algo": transport} if transport in ("oneshot", "twoshot") else {"transport": transport}
                        y = allreduce(buf, out=buf if inplace else None, op=op, **how)
                        got = y.get().astype(np.float64)
                        if inplace:
                            buf.fill(7)   # scribble right after return: peers must be done with it
                        err = np.abs(got - ref) / np.maximum(scale, 1e-300)
                        bad = int(np.count_nonzero(~(err <= tol)))
                        if bad:
                            raise AssertionError(f"rank {rank} {transport} {dtype} {op} count={count} "
                                                 f"inplace={inplace} rep={rep}: {bad} wrong, max err {err.max():.3g}")
                        d = comm.allgather(hashlib.sha256(y.get().tobytes()).hexdigest() if not inplace else
                                           hashlib.sha256(got.tobytes()).hexdigest())
                        assert len(set(d)) == 1, f"{transport} {dtype} {op}: ranks differ bitwise"
                cases += 1
    comm.Barrier()
    if rank == 0:
        print(f"  {transport}: ok ({time.perf_counter() - t_start:.1f} s)", flush=True)
# The executors themselves, each bound to its algorithm at construction: integer-valued floats, so exact.
direct = {"oneshot": lambda: get_ipc_direct(comm, "oneshot"), "twoshot": lambda: get_ipc_direct(comm, "twoshot"),
          "ipc": lambda: get_ipc_ring(comm), "ipc-host": lambda: get_ipc_ring(comm, 1, "host"),
          "ipc-shared": lambda: get_ipc_ring(comm, 1, "shared")}
named = [t for t in transports if t in direct] if ipc_usable(comm)[0] else []
for name in named:
    for count in counts:
        x = cupy.asarray((np.arange(count) % 7 + rank).astype(np.float32))
        want = {"sum": (np.arange(count) % 7) * n + n * (n - 1) / 2, "max": np.arange(count) % 7 + n - 1}
        for op, ref in want.items():
            for inplace in (False, True):
                src = x.copy()
                out = src if inplace else cupy.full_like(x, -1)
                assert direct[name]().allreduce(src, out, op, timeout=60) is True
                if not np.array_equal(out.get(), ref.astype(np.float32)):
                    raise AssertionError(f"rank {rank} executor {name} {op} count={count} inplace={inplace}: wrong")
                cases += 1
comm.Barrier()
if rank == 0:
    if named:
        print(f"  executors called directly: {', '.join(named)}: ok", flush=True)
    print(f"gpu_check OK: N={n} transports={transports} cases={cases}")
