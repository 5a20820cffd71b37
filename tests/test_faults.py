"""A rank that dies or stalls mid-collective: every process exits, non-zero, within the timeout.

Faults are injected with RINGLAB_FAULT (collectives/faults.py) into tests/mpi/fault_worker.py under
``mpirun -n 4``. MPICH's hydra kills the whole job when a rank dies abnormally, so the "kill"
cases check the exit and the bound; the "stall" cases check the survivors' own error, which names
the stalled peer, and the abort exit code.
"""
import time

import pytest

from ringlab.errors import ABORT_EXIT_CODE
from ringlab.faults import FaultInjected, parse_fault, set_fault
from ringlab.launch import launcher_flavour

TIMEOUT_S = 4          # RINGLAB_TIMEOUT inside the jobs
BOUND_S = 45           # start-up of 4 interpreters on 2 busy cores + timeout + abort grace
SUBPROCESS_S = 90      # run_mpi's own limit: larger than BOUND_S, so a hang shows as a failure


def _run(run_mpi, scenario, fault=None, extra_env=None, nprocs=4, args=()):
    env = {"RINGLAB_TIMEOUT": str(TIMEOUT_S)}
    if fault:
        env["RINGLAB_FAULT"] = fault
    env.update(extra_env or {})
    t0 = time.monotonic()
    res = run_mpi(nprocs, "tests/mpi/fault_worker.py", scenario, *args, timeout=SUBPROCESS_S, env=env, check=False)
    elapsed = time.monotonic() - t0
    assert elapsed < BOUND_S, f"job took {elapsed:.1f} s (bound {BOUND_S} s)\n{res.stderr[-3000:]}"
    assert "WRONG" not in res.stdout, res.stdout
    return res


@pytest.mark.parametrize("fault", ["rank=2,step=1,action=kill",                       # reduce-scatter
                                   "rank=1,step=0,phase=all-gather,action=kill"])    # all-gather
def test_killed_rank_ends_the_job_nonzero(run_mpi, fault):
    res = _run(run_mpi, "ring", fault)
    assert res.returncode != 0
    assert "fault injection: rank" in res.stderr and "kill" in res.stderr


def test_stalled_rank_makes_survivors_name_it_and_abort(run_mpi):
    res = _run(run_mpi, "ring", "rank=2,step=1,action=stall")
    assert res.returncode == ABORT_EXIT_CODE, res.stderr[-3000:]
    # Rank 3 receives from rank 2 in the ring, so it is the survivor that names the stalled peer.
    assert "ringlab: CollectiveTimeout: rank 3: peer rank 2 did not send during ring reduce-scatter" in res.stderr
    assert f"aborting MPI_COMM_WORLD with exit code {ABORT_EXIT_CODE}" in res.stderr


def test_python_error_on_one_rank_times_out_the_others(run_mpi):
    res = _run(run_mpi, "ring", "rank=0,step=4,action=raise")
    assert res.returncode != 0
    assert "FaultInjected" in res.stderr
    if launcher_flavour() == "mpich":  # hydra lets the others run on into the timeout; Open MPI ends the job
        assert res.returncode == ABORT_EXIT_CODE
        assert "ringlab: CollectiveTimeout: rank 1: peer rank 0 did not send" in res.stderr


def test_rank_dead_before_the_collective(run_mpi):
    res = _run(run_mpi, "die-before", args=("--victim", "3"))
    assert res.returncode != 0
    assert "rank 3 dies before call" in res.stdout


def test_raise_mode_gives_the_caller_a_catchable_timeout(run_mpi):
    res = _run(run_mpi, "raise-mode", "rank=1,step=2,action=stall", {"RINGLAB_ABORT_ON_TIMEOUT": "0"})
    assert res.returncode == 3, res.stderr[-3000:]
    assert "caught CollectiveTimeout: rank 2: peer rank 1 did not send" in res.stderr
    assert "aborting MPI_COMM_WORLD" not in res.stderr   # the library did not abort: the caller did


# ---- the fault-injection hook itself (no MPI job) ----------------------------------------------

def test_fault_spec_parsing():
    plan = parse_fault("rank=2, step=3, action=stall, seconds=1.5, phase=all-gather")
    assert (plan.rank, plan.step, plan.action, plan.seconds, plan.phase) == (2, 3, "stall", 1.5, "all-gather")
    assert parse_fault(None) is None and parse_fault("  ") is None
    for bad in ["rank=2,step=3", "rank=2,step=3,action=explode", "rank=2,step=3,action=kill,when=now",
                "rank=2;step=3;action=kill", "rank=2,step=3,action=kill,phase=broadcast"]:
        with pytest.raises(ValueError, match="RINGLAB_FAULT"):
            parse_fault(bad)


def test_fault_fires_once_at_the_planned_step_of_the_planned_rank():
    from ringlab import faults
    from ringlab.schedule import ring_allreduce_schedule
    try:
        set_fault("rank=1,step=4,action=raise")
        assert faults.ring_step_hook(0) is None            # other ranks pay nothing
        hook = faults.ring_step_hook(1)
        steps = ring_allreduce_schedule(1, 4)              # 3 reduce-scatter + 3 all-gather steps
        for st in steps[:4]:
            hook(st)
        with pytest.raises(FaultInjected, match="ring step 4 \\(all-gather step 1\\)"):
            hook(steps[4])
        hook(steps[5])                                     # later steps do not fire again
        set_fault("rank=1,step=1,phase=all-gather,action=raise")
        hook = faults.ring_step_hook(1)
        for st in steps[:4]:
            hook(st)
        with pytest.raises(FaultInjected, match="all-gather step 1"):
            hook(steps[4])
    finally:
        set_fault(None)
    assert faults.ring_step_hook(1) is None


def test_fault_drill_script_reports_its_summary_line():
    """experiments/fault_drill.py on one quick scenario (the full drill's output is in docs/results/faults)."""
    import subprocess
    import sys

    from conftest import ROOT, mpi_env
    for only in ("kill, rank 0",):
        proc = subprocess.run([sys.executable, "experiments/fault_drill.py", "--only", only], cwd=ROOT, env=mpi_env(),
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "hangs: 0, data corrupted: 0, unexpected outcomes: 0" in proc.stdout, proc.stdout


@pytest.mark.parametrize("attempt", [0, 1, 2])
def test_python_error_mid_collective_at_n3_always_ends_in_75_with_each_survivors_line(run_mpi, attempt):
    """The raising rank must not finalize MPI (MPICH asserted there, ending the job before any survivor spoke)."""
    res = _run(run_mpi, "ring", f"rank={attempt},step=1,action=raise", nprocs=3)
    assert res.returncode == ABORT_EXIT_CODE, res.stderr[-3000:]
    assert "FaultInjected" in res.stderr and "not finalizing MPI" in res.stderr
    survivors = [r for r in range(3) if r != attempt]
    for r in survivors:
        assert f"ringlab: CollectiveTimeout: rank {r}: peer rank" in res.stderr, res.stderr[-3000:]
