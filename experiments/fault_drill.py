"""Fault drill: run every fault scenario as an mpirun job and count hangs and corrupted results.

    python experiments/fault_drill.py [--timeout 4] [--out docs/results/faults/fault_drill.txt]

Scenarios: every argument mismatch of tests/mpi/validate_fields.py (N = 3 and 4; each followed by a
verified correct all-reduce), and rank failures injected into tests/mpi/fault_worker.py with
RINGLAB_FAULT (kill, stall, exit, Python error) or by the worker (skip the call, die before it).
A job is a hang if it is still running after ``timeout + --slack`` seconds (it is then killed);
data is corrupted if any rank reports a wrong all-reduce result. Ends with the summary line
"faults tried: X, hangs: H, data corrupted: C, unexpected outcomes: U".
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ringlab.errors import ABORT_EXIT_CODE  # noqa: E402
from ringlab.launch import launcher_flavour, mpirun_command  # noqa: E402

FAULT, VALIDATE = "tests/mpi/fault_worker.py", "tests/mpi/validate_fields.py"
A = ABORT_EXIT_CODE

# name, ranks, script + args, RINGLAB_FAULT, extra env, expected exit ("nonzero", "any" or a code),
# text that must appear in stderr (the survivors' error naming the peer, where they live to print it)
SCENARIOS = [
    ("mismatches (13 fields/cases)", 3, [VALIDATE], None, {}, 0, []),
    ("mismatches (13 fields/cases)", 4, [VALIDATE], None, {}, 0, []),
    ("kill, reduce-scatter step 1", 4, [FAULT, "ring"], "rank=2,step=1,action=kill", {}, "nonzero", []),
    ("kill, all-gather step 0", 4, [FAULT, "ring"], "rank=1,step=0,phase=all-gather,action=kill", {}, "nonzero", []),
    ("kill, 2nd call", 4, [FAULT, "ring"], "rank=3,step=7,action=kill", {}, "nonzero", []),
    ("kill, rank 0", 3, [FAULT, "ring"], "rank=0,step=2,action=kill", {}, "nonzero", []),
    ("kill before the call", 4, [FAULT, "die-before", "--victim", "1"], None, {}, "nonzero", []),
    ("stall, reduce-scatter", 4, [FAULT, "ring"], "rank=2,step=1,action=stall", {}, A,
     ["rank 3: peer rank 2 did not send during ring reduce-scatter step 1"]),
    ("stall, all-gather", 4, [FAULT, "ring"], "rank=0,step=2,phase=all-gather,action=stall", {}, A,
     ["rank 1: peer rank 0 did not send during ring all-gather step 2"]),
    ("stall, last rank", 5, [FAULT, "ring"], "rank=4,step=0,action=stall", {}, A,
     ["rank 0: peer rank 4 did not send during ring reduce-scatter step 0"]),
    ("exit(0) mid-collective", 4, [FAULT, "ring"], "rank=2,step=3,action=exit", {}, "any", []),
    ("exit(1) mid-collective", 4, [FAULT, "ring"], "rank=2,step=4,action=exit,code=1", {}, "nonzero", []),
    ("one rank rejects an argument (12 cases)", 3, ["tests/mpi/one_rank_rejects.py"], None, {}, 0, []),
    # the raising rank does not finalize MPI (pending requests): the survivors time out and abort, 75
    ("Python error mid-collective", 4, [FAULT, "ring"], "rank=0,step=4,action=raise", {}, A,
     ["FaultInjected", "not finalizing MPI", "rank 1: peer rank 0 did not send during ring all-gather step 1"]),
    ("Python error mid-collective, N=3", 3, [FAULT, "ring"], "rank=1,step=1,action=raise", {}, A,
     ["FaultInjected", "not finalizing MPI", "rank 2: peer rank 1 did not send"]),
    ("skips the call (validated)", 4, [FAULT, "skip", "--victim", "2"], None, {}, A,
     ["not every rank reached the argument check of allreduce"]),
    ("skips the call (validate=False)", 4, [FAULT, "skip-noval", "--victim", "2"], None, {}, A,
     ["rank 3: peer rank 2 did not send during ring reduce-scatter step 0"]),
    ("skips, timeout=2 beats env 600", 3, [FAULT, "skip", "--victim", "1", "--timeout", "2"], None,
     {"RINGLAB_TIMEOUT": "600"}, A, ["within 2 s"]),
    ("stall, RINGLAB_ABORT_ON_TIMEOUT=0", 4, [FAULT, "raise-mode"], "rank=1,step=2,action=stall",
     {"RINGLAB_ABORT_ON_TIMEOUT": "0"}, 3, ["caught CollectiveTimeout: rank 2: peer rank 1 did not send"]),
]


def run_scenario(scenario, timeout_s, slack_s):
    """Run one job; returns a result dict (verdicts included)."""
    name, nprocs, argv, fault, extra_env, want_rc, want_err = scenario
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               RINGLAB_TIMEOUT=str(timeout_s), PYTHONUNBUFFERED="1")
    env.pop("RINGLAB_FAULT", None)
    if fault:
        env["RINGLAB_FAULT"] = fault
    env.update(extra_env)
    cmd = mpirun_command(nprocs, sys.executable, os.path.join(ROOT, argv[0]), *argv[1:])
    bound = timeout_s + slack_s
    t0 = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=bound)
        rc, out, err, hung = proc.returncode, proc.stdout, proc.stderr, False
    except subprocess.TimeoutExpired as exc:
        rc, hung = None, True
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        err = exc.stderr.decode() if isinstance(exc.stderr, bytes) else (exc.stderr or "")
    wall = time.monotonic() - t0
    corrupted = "WRONG" in out or "corrupted after mismatch" in err
    faults = len(re.findall(r"^case ", out, re.M)) if argv[0] == VALIDATE else 1
    rc_ok = (rc is not None and (want_rc == "any" or (want_rc == "nonzero" and rc != 0) or rc == want_rc))
    mpich = launcher_flavour() == "mpich"
    want_err = [t.split(":", 1)[1] if t.startswith("mpich:") else t for t in want_err
                if mpich or not t.startswith("mpich:")]
    missing = [t for t in want_err if t not in err]
    expected = not hung and rc_ok and not missing and not corrupted
    return dict(name=name, ranks=nprocs, fault=fault or "-", rc=rc, wall_s=round(wall, 1), hung=hung,
                corrupted=corrupted, faults=faults, expected=expected, missing=missing,
                first_error=_shown_error(err, want_err))


def _shown_error(err, want_err):
    """The survivor's error line to quote: the one naming the culprit if expected, else the first."""
    errors = [ln for ln in err.splitlines() if "CollectiveTimeout" in ln and not ln.startswith("  ")]
    named = [ln for ln in errors if any(t in ln for t in want_err)]
    return (named or errors or [""])[0][:200]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--timeout", type=float, default=4.0, help="RINGLAB_TIMEOUT for every job (s)")
    p.add_argument("--slack", type=float, default=40.0, help="start-up + abort allowance before a job counts as hung")
    p.add_argument("--only", default=None, help="run scenarios whose name contains this text")
    p.add_argument("--out", default=None, help="also write the report to this file")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    lines = [f"fault drill: launcher={launcher_flavour()}, RINGLAB_TIMEOUT={args.timeout:g} s, "
             f"hang = still running after {args.timeout + args.slack:g} s",
             f"{'scenario':<34}{'N':>3} {'exit':>5} {'wall_s':>7}  verdict"]
    print("\n".join(lines), flush=True)
    results = []
    for sc in SCENARIOS:
        if args.only and args.only not in sc[0]:
            continue
        r = run_scenario(sc, args.timeout, args.slack)
        results.append(r)
        verdict = "HANG" if r["hung"] else "CORRUPT" if r["corrupted"] else "ok" if r["expected"] else \
            f"UNEXPECTED (missing {r['missing']})"
        line = f"{r['name']:<34}{r['ranks']:>3} {str(r['rc']):>5} {r['wall_s']:>7}  {verdict}"
        if r["first_error"]:
            line += f"\n{'':<4}{r['first_error']}"
        lines.append(line)
        print(line, flush=True)
    tried = sum(r["faults"] for r in results)
    mismatches = sum(r["faults"] for r in results if "mismatch" in r["name"])
    summary = (f"faults tried: {tried} ({mismatches} argument mismatches, {tried - mismatches} rank failures), "
               f"hangs: {sum(r['hung'] for r in results)}, data corrupted: {sum(r['corrupted'] for r in results)}, "
               f"unexpected outcomes: {sum(not r['expected'] for r in results)}, "
               f"slowest job: {max((r['wall_s'] for r in results), default=0):g} s")
    lines.append(summary)
    print(summary, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"timeout_s": args.timeout, "results": results, "summary": summary}, f, indent=1)
    return 0 if all(r["expected"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
