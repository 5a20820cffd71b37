"""Resource hygiene: over 1,000 repeated collectives on 4 ranks, RSS, the Python heap and open file
descriptors stay flat after a warm-up (tests/mpi/leak_rss.py states the bounds and why).

The GPU side (device memory pool, pinned staging buffers, IPC handles) is measured by
experiments/leak_check.py on the device; on CPU that script measures RSS only, checked here too.
"""
import re


def test_no_growth_over_a_thousand_collectives(run_mpi):
    res = run_mpi(4, "tests/mpi/leak_rss.py", timeout=240, env={"RINGLAB_TIMEOUT": "60"})
    assert "leak check: ok" in res.stdout, res.stdout
    calls = [int(c) for c in re.findall(r"rank \d: (\d+) collectives", res.stdout)]
    assert len(calls) == 4 and min(calls) >= 1000, res.stdout


def test_device_leak_script_runs_on_cpu(run_mpi):
    res = run_mpi(2, "experiments/leak_check.py", "--iters", "120", "--warmup", "20", timeout=240,
                  env={"RINGLAB_TIMEOUT": "60"})
    assert "leak check: ok" in res.stdout and "backend=numpy" in res.stdout, res.stdout
