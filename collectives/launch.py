"""Find an MPI launcher and build ``mpirun -n K`` command lines that work for MPICH and Open MPI."""
import os
import shutil
import subprocess
import sys
from functools import lru_cache

__all__ = ["mpirun_command", "launcher_flavour"]


@lru_cache(maxsize=None)
def _launcher():
    here = os.path.dirname(sys.executable)  # a venv's bin/ first: the mpich wheel installs there
    for name in ("mpirun", "mpiexec"):
        cand = os.path.join(here, name)
        if os.path.exists(cand):
            return cand
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name)
        if found:
            return found
    raise FileNotFoundError("no mpirun/mpiexec found: `pip install mpich` provides one")


@lru_cache(maxsize=None)
def launcher_flavour():
    """'openmpi', 'mpich' or 'unknown', from the launcher's --version text."""
    try:
        text = subprocess.run([_launcher(), "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "Open MPI" in text or "OpenRTE" in text:
        return "openmpi"
    if "HYDRA" in text or "MPICH" in text or "hydra" in text:
        return "mpich"
    return "unknown"


def mpirun_command(nprocs, *args):
    """``[mpirun, -n, K, ...args]`` with Open MPI's root and oversubscription flags when needed."""
    cmd = [_launcher(), "-n", str(nprocs)]
    if launcher_flavour() == "openmpi":
        cmd += ["--oversubscribe"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            cmd += ["--allow-run-as-root"]
    return cmd + [str(a) for a in args]
