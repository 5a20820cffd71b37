"""What happens when a rank fails mid-collective: the timeout policy, and test-only fault injection."""
# Timeout policy. When a bounded wait expires (``transport.wait_all``), ``handle_timeout(exc)`` runs
# before the CollectiveTimeout is raised:
#   * a handler installed with ``set_timeout_handler(fn)`` is called with the exception (it may log,
#     abort, or return to let the exception propagate);
#   * otherwise, with RINGLAB_ABORT_ON_TIMEOUT=1 (the default) the error is printed to stderr, the rank
#     waits ABORT_GRACE_S so the other survivors can print theirs, and MPI_COMM_WORLD is aborted with
#     exit code ABORT_EXIT_CODE (75). Aborting is the default because after a timeout the peers'
#     messages are still in flight: reusing the communicator could match them to a later call.
#   * with RINGLAB_ABORT_ON_TIMEOUT=0 the exception is simply raised to the caller.
#
# Fault injection (tests and experiments/fault_drill.py only). RINGLAB_FAULT, read at each ring call
# (through settings.py):
#     RINGLAB_FAULT="rank=2,step=3,action=kill"      keys: rank, step, action, phase, seconds, code
#   * ``step``: fire at this rank's step-th ring step (0-based), counted over every ring step the
#     process runs (an N-rank all-reduce has N-1 reduce-scatter steps, then N-1 all-gather steps);
#     with ``phase=reduce-scatter`` or ``phase=all-gather`` only that phase's steps are counted.
#   * ``action``: kill (SIGKILL itself), stall (sleep ``seconds``, default 3600, inside the
#     collective), exit (os._exit(``code``, default 0) without finalizing MPI), raise (FaultInjected).
# When RINGLAB_FAULT is unset the ring executor's per-call lookup returns None and each step pays
# one ``is not None`` test.

import os
import signal
import sys
import time
from dataclasses import dataclass, replace

from ringlab import settings

from ringlab.errors import ABORT_EXIT_CODE, abort_on_timeout_enabled

__all__ = ["FaultPlan", "FaultInjected", "parse_fault", "set_fault", "ring_step_hook", "set_timeout_handler",
           "handle_timeout", "abort_job", "linger_at_exit", "ABORT_GRACE_S", "ACTIONS"]

ABORT_GRACE_S = 1.0
ACTIONS = ("kill", "stall", "exit", "raise")
_PHASES = ("reduce-scatter", "all-gather")


class FaultInjected(RuntimeError):
    """Raised by the ``raise`` fault action: a Python error on one rank in the middle of a collective."""


@dataclass
class FaultPlan:
    """One planned fault: ``action`` on ``rank`` at its ``step``-th ring step (see module docstring)."""
    rank: int
    step: int
    action: str
    phase: str = None
    seconds: float = 3600.0
    code: int = 0
    steps_seen: int = 0

    def at_ring_step(self, ring_step):
        """Count one ring step of this rank and fire when it is the planned one."""
        if self.phase is not None and ring_step.phase != self.phase:
            return
        index = self.steps_seen
        self.steps_seen += 1
        if index == self.step:
            self.fire(f"ring step {index} ({ring_step.phase} step {ring_step.step})")

    def fire(self, where):
        sys.stderr.write(f"ringlab fault injection: rank {self.rank} {self.action} at {where}\n")
        sys.stderr.flush()
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.action == "stall":
            time.sleep(self.seconds)
        elif self.action == "exit":
            os._exit(self.code)
        elif self.action == "raise":
            raise FaultInjected(f"injected fault on rank {self.rank} at {where}")


def parse_fault(text):
    """A FaultPlan from ``"rank=2,step=3,action=kill"``, or None for an empty/unset value."""
    if text is None or not text.strip():
        return None
    fields = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"RINGLAB_FAULT: expected key=value, got {item!r} in {text!r}")
        fields[key.strip()] = value.strip()
    unknown = set(fields) - {"rank", "step", "action", "phase", "seconds", "code"}
    if unknown or not {"rank", "step", "action"} <= set(fields):
        raise ValueError(f"RINGLAB_FAULT={text!r}: needs rank, step, action; optional phase, seconds, code"
                         f"{'; unknown: ' + ', '.join(sorted(unknown)) if unknown else ''}")
    if fields["action"] not in ACTIONS:
        raise ValueError(f"RINGLAB_FAULT: action must be one of {', '.join(ACTIONS)}, got {fields['action']!r}")
    phase = fields.get("phase")
    if phase is not None and phase not in _PHASES:
        raise ValueError(f"RINGLAB_FAULT: phase must be one of {', '.join(_PHASES)}, got {phase!r}")
    return FaultPlan(rank=int(fields["rank"]), step=int(fields["step"]), action=fields["action"], phase=phase,
                     seconds=float(fields.get("seconds", 3600.0)), code=int(fields.get("code", 0)))


settings.register(replace(settings.SETTINGS["RINGLAB_FAULT"], parse=parse_fault))
_UNSET = object()
_override = _UNSET      # set_fault's plan (in-process tests); otherwise $RINGLAB_FAULT, read at each call


def planned_fault():
    """The FaultPlan in force: set_fault's, else $RINGLAB_FAULT's (None when there is none)."""
    return settings.get("RINGLAB_FAULT") if _override is _UNSET else _override


def set_fault(text):
    """Replace the planned fault (None clears it); returns the new plan. For in-process tests."""
    global _override
    _override = parse_fault(text)
    return _override


def ring_step_hook(rank):
    """The per-step fault callback for ``rank``, or None when no fault is planned for it."""
    plan = planned_fault()
    if plan is None or plan.rank != rank:
        return None
    return plan.at_ring_step


# ---- timeout policy --------------------------------------------------------------------------

_timeout_handler = None


def set_timeout_handler(handler):
    """Install ``handler(exc)`` to run on every CollectiveTimeout (None restores the default
    abort/raise policy); returns the previous handler. If it returns, the exception is raised."""
    global _timeout_handler
    previous, _timeout_handler = _timeout_handler, handler
    return previous


def handle_timeout(exc):
    """Apply the timeout policy to ``exc``; returns only if the caller should raise it."""
    if _timeout_handler is not None:
        _timeout_handler(exc)
        return
    if abort_on_timeout_enabled():
        abort_job(exc)


def abort_job(exc, code=ABORT_EXIT_CODE, grace_s=ABORT_GRACE_S):
    """Print ``exc`` to stderr, give the other ranks ``grace_s`` to print theirs, abort the job."""
    from mpi4py import MPI
    sys.stderr.write(f"ringlab: {type(exc).__name__}: {exc}\n"
                     f"ringlab: rank {MPI.COMM_WORLD.rank} aborting MPI_COMM_WORLD with exit code {code} "
                     "(set RINGLAB_ABORT_ON_TIMEOUT=0 to get the exception instead)\n")
    sys.stderr.flush()
    time.sleep(grace_s)
    try:
        MPI.COMM_WORLD.Abort(code)
    finally:
        # MPI_Abort may return while the launcher tears the job down (seen with MPICH 5.0 with hydra):
        # never let this rank run on with a communicator in an unknown state.
        os._exit(code)


# ---- a rank whose collective raised mid-flight -------------------------------------------------

_linger = None      # (seconds or None, reason) once a collective of this process failed mid-flight


def linger_at_exit(comm, seconds, reason):
    """Called when a collective raised on this rank after data started to move (api.collective_call).

    Its peers are still waiting inside that collective. Exiting normally would run MPI_Finalize with
    requests pending (MPICH can fail an assertion there, and the launcher then ends the job before any
    peer says why), so at exit this rank instead waits for the peers' timeout to abort the job
    (exit 75, a line from each survivor), and aborts it itself if none has after ``seconds`` + grace.
    """
    global _linger
    first = _linger is None
    worst = seconds if _linger is None or seconds is None or _linger[0] is None else max(seconds, _linger[0])
    _linger = (worst, reason)
    if first:
        import atexit
        atexit.register(_linger_now)   # runs before mpi4py's MPI_Finalize (registered at import, earlier)


def _linger_now():
    seconds, reason = _linger
    from mpi4py import MPI
    rank = MPI.COMM_WORLD.rank
    if seconds is None:     # no timeout: the peers would wait forever, so end the job now
        abort_job(RuntimeError(f"rank {rank}: a collective failed mid-flight ({reason}); with no timeout set "
                               "its peers would wait forever"))
    sys.stderr.write(f"ringlab: rank {rank}: a collective failed mid-flight ({reason}); not finalizing MPI: "
                     f"waiting up to {seconds + 4 * ABORT_GRACE_S:g} s for the peers' timeout to end the job\n")
    sys.stderr.flush()
    time.sleep(seconds + 4 * ABORT_GRACE_S)
    abort_job(RuntimeError(f"rank {rank}: a collective failed mid-flight ({reason}) and no peer ended the job"))
