"""The launcher helper adds Open MPI's root/oversubscribe flags and nothing for MPICH."""
import os

from ringlab import launch


def test_openmpi_gets_oversubscribe_and_root_flags(monkeypatch):
    monkeypatch.setattr(launch, "launcher_flavour", lambda: "openmpi")
    monkeypatch.setattr(launch, "_launcher", lambda: "/x/mpirun")
    cmd = launch.mpirun_command(8, "python", "a.py")
    assert cmd[:3] == ["/x/mpirun", "-n", "8"] and "--oversubscribe" in cmd
    assert ("--allow-run-as-root" in cmd) == (os.geteuid() == 0)
    assert cmd[-2:] == ["python", "a.py"]


def test_mpich_gets_plain_command(monkeypatch):
    monkeypatch.setattr(launch, "launcher_flavour", lambda: "mpich")
    monkeypatch.setattr(launch, "_launcher", lambda: "/x/mpirun")
    assert launch.mpirun_command(3, "python") == ["/x/mpirun", "-n", "3", "python"]


def test_real_launcher_is_found_and_identified():
    assert os.path.exists(launch._launcher())
    assert launch.launcher_flavour() in ("mpich", "openmpi", "unknown")
