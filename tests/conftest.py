"""Shared fixtures: ``run_mpi`` launches a real ``mpirun -n K`` with a timeout, so a deadlock fails."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ringlab.launch import mpirun_command  # noqa: E402


class MpiResult:
    def __init__(self, proc, cmd):
        self.returncode, self.stdout, self.stderr, self.cmd = proc.returncode, proc.stdout, proc.stderr, cmd

    def check(self):
        assert self.returncode == 0, (f"{' '.join(self.cmd)} exited {self.returncode}\n"
                                      f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")
        return self


def mpi_env(extra=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMPI_MCA_rmaps_base_oversubscribe", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
    env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    env.setdefault("NUMBA_ENABLE_CUDASIM", env.get("NUMBA_ENABLE_CUDASIM", "0"))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


@pytest.fixture
def run_mpi():
    """run_mpi(K, script, *args, timeout=120, env=None, check=True) -> MpiResult.

    ``script`` is a path relative to the repository root (tests/mpi/*.py or experiments/*.py).
    A run that exceeds ``timeout`` is killed and fails the test instead of hanging it.
    """
    def run(nprocs, script, *args, timeout=120, env=None, check=True):
        cmd = mpirun_command(nprocs, sys.executable, os.path.join(ROOT, script), *args)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=mpi_env(env), cwd=ROOT)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"{' '.join(cmd)} did not finish within {timeout}s (deadlock?)\n"
                        f"stdout: {(exc.stdout or b'')[-2000:]!r}\nstderr: {(exc.stderr or b'')[-2000:]!r}")
        result = MpiResult(proc, cmd)
        return result.check() if check else result
    return run
