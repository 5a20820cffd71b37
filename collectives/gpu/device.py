"""Which transport moves device (CuPy) buffers: IPC, CUDA-aware MPI, or host staging."""
# IPC when every rank has a GPU on one node (``device``, the persistent-kernel ring, when they all share one GPU, whose
# processes would otherwise time-slice at every ring step); CUDA-aware MPI when the library says so and a guarded
# probe (in a child process, since a non-CUDA-aware MPI segfaults on device pointers) agrees;
# otherwise staging through pinned host memory. $RINGLAB_TRANSPORT overrides: auto, device (persistent kernel),
# ipc, ipc-host, ipc-shared, mpi (CUDA-aware), staged; ``ipc:4`` sets 4 pipeline slices per step.

import subprocess
import sys

from mpi4py import MPI

from ringlab import settings
from ringlab.commstate import comm_state
from ringlab.settings import TRANSPORTS

__all__ = ["parse_transport", "select_transport", "cuda_aware_mpi", "TRANSPORTS"]

# Self-contained (no ringlab import: the child may not find the package the parent was imported from).
_PROBE = r"""
import cupy, numpy as np
from mpi4py import MPI

a = cupy.arange(4, dtype=cupy.float32); b = cupy.zeros(4, dtype=cupy.float32)
cupy.cuda.get_current_stream().synchronize()
MPI.COMM_SELF.Sendrecv(a, 0, 0, b, 0, 0)
assert np.array_equal(b.get(), np.arange(4, dtype=np.float32))
print("CUDA-AWARE-OK")
"""


def parse_transport(text):
    """'ipc:4' -> ('ipc', 4); 'staged' -> ('staged', 1). Raises ValueError for unknown names."""
    return settings.parse_transport(text, default_slices=settings.get("RINGLAB_IPC_SLICES"))


def _library_says_cuda_aware():
    """The MPI library's own signal: Open MPI's ompi_info, MPICH's configure line."""
    version = MPI.Get_library_version()
    if "Open MPI" in version:
        try:
            out = subprocess.run(["ompi_info", "--parsable", "--all"], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        return "mpi_built_with_cuda_support:value:true" in out
    return "--with-cuda" in version or "with-cuda" in version.lower()


def cuda_aware_mpi(comm):
    """True only if the library claims CUDA support and a child-process probe survives it."""
    forced = settings.get("RINGLAB_CUDA_AWARE")
    if forced is not None:
        return forced
    verdict = None
    if comm.rank == 0:
        verdict = False
        if _library_says_cuda_aware():
            verdict = probe_cuda_aware_mpi()
    return comm.bcast(verdict, root=0)


def probe_cuda_aware_mpi(env=None):
    """Run _PROBE in a child process (a non-CUDA-aware MPI segfaults on device pointers): True if it passed."""
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120, env=env)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "CUDA-AWARE-OK" in out.stdout


def select_transport(comm, requested=None):
    """(name, slices, why): the device transport for ``comm``; auto picks the fastest usable one."""
    name, slices = parse_transport(requested or settings.get("RINGLAB_TRANSPORT"))
    if name != "auto":
        return name, slices, "requested"
    state = comm_state(comm)
    if "transport" not in state:
        from ringlab.gpu.ipc import ipc_usable
        ok, why = ipc_usable(comm)
        if ok:
            from ringlab.gpu.ipc import all_ranks_share_one_gpu
            if comm.size > 1 and all_ranks_share_one_gpu(comm):
                state["transport"] = ("device", f"{why}; all {comm.size} ranks share one GPU: the persistent-kernel "
                                      "ring (per-rank kernels under MPS, else one context drives every rank)")
            else:
                state["transport"] = ("ipc", why)
        elif cuda_aware_mpi(comm):
            state["transport"] = ("mpi", f"CUDA-aware MPI ({why})")
        else:
            state["transport"] = ("staged", f"host staging: {why}; MPI not CUDA-aware")
    chosen, why = state["transport"]
    return chosen, slices, why
