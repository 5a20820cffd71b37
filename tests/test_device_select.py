"""Transport selection for device buffers, on a machine without a GPU (no mpirun needed)."""
import pytest
from mpi4py import MPI

from ringlab.gpu import device
from ringlab.gpu.device import cuda_aware_mpi, parse_transport, select_transport


@pytest.mark.parametrize("text,expected", [(None, ("auto", 1)), ("ipc", ("ipc", 1)), ("ipc:4", ("ipc", 4)),
                                           ("staged", ("staged", 1)), ("ipc-shared", ("ipc-shared", 1))])
def test_parse_transport(text, expected, monkeypatch):
    monkeypatch.delenv("RINGLAB_IPC_SLICES", raising=False)
    assert parse_transport(text) == expected


@pytest.mark.parametrize("bad", ["nccl", "ipc:0", "ipc:x", "IPC"])
def test_parse_transport_rejects_bad_names(bad):
    with pytest.raises(ValueError):
        parse_transport(bad)


def test_env_slices_default(monkeypatch):
    monkeypatch.setenv("RINGLAB_IPC_SLICES", "8")
    assert parse_transport("ipc") == ("ipc", 8)


def test_cuda_aware_env_override_wins(monkeypatch):
    monkeypatch.setenv("RINGLAB_CUDA_AWARE", "1")
    assert cuda_aware_mpi(MPI.COMM_SELF) is True
    monkeypatch.setenv("RINGLAB_CUDA_AWARE", "0")
    assert cuda_aware_mpi(MPI.COMM_SELF) is False


def test_library_signal_is_read_from_the_version_text(monkeypatch):
    monkeypatch.setattr(device.MPI, "Get_library_version", lambda: "MPICH Version: 4.2\nMPICH Configure: --with-cuda=/usr")
    assert device._library_says_cuda_aware()
    monkeypatch.setattr(device.MPI, "Get_library_version", lambda: "MPICH Version: 5.0.2\nMPICH Device: ch4:ofi")
    assert not device._library_says_cuda_aware()


def test_no_gpu_means_host_staging_with_a_reason(monkeypatch):
    monkeypatch.delenv("RINGLAB_TRANSPORT", raising=False)
    monkeypatch.setenv("RINGLAB_CUDA_AWARE", "0")
    comm = MPI.COMM_SELF.Dup()
    try:
        name, slices, why = select_transport(comm)
        assert name == "staged" and slices == 1 and "no GPU" in why
    finally:
        comm.Free()


def test_requested_transport_is_taken_as_is():
    assert select_transport(MPI.COMM_SELF, "ipc:2") == ("ipc", 2, "requested")


def test_ipc_usability_is_decided_once_per_communicator(monkeypatch):
    from ringlab.gpu import ipc
    calls = []
    monkeypatch.setattr(ipc, "_ipc_usable", lambda comm: calls.append(comm) or (False, "no GPU"))
    comm = MPI.COMM_SELF.Dup()
    try:
        assert ipc.ipc_usable(comm) == (False, "no GPU")
        assert ipc.ipc_usable(comm) == (False, "no GPU")
        assert len(calls) == 1
    finally:
        comm.Free()


def test_cuda_aware_probe_runs_in_a_child_process(tmp_path):
    """The probe is real code run by ``python -c``: with a stand-in ``cupy`` (host arrays) it must pass,
    and without any cupy it must fail cleanly (a relative import in it used to fail it always)."""
    import os

    from ringlab.gpu.device import probe_cuda_aware_mpi
    fake = tmp_path / "cupy"
    fake.mkdir()
    (fake / "__init__.py").write_text(
        "import numpy as _np\n"
        "class ndarray(_np.ndarray):\n"
        "    def get(self):\n"
        "        return _np.asarray(self)\n"
        "float32 = _np.float32\n"
        "def arange(n, dtype=None):\n"
        "    return _np.arange(n, dtype=dtype).view(ndarray)\n"
        "def zeros(n, dtype=None):\n"
        "    return _np.zeros(n, dtype=dtype).view(ndarray)\n"
        "class _Stream:\n"
        "    def synchronize(self):\n"
        "        pass\n"
        "class cuda:\n"
        "    get_current_stream = staticmethod(lambda: _Stream())\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    assert probe_cuda_aware_mpi(env) is True
    env["PYTHONPATH"] = str(tmp_path / "nothing-here")
    try:
        import cupy  # noqa: F401
    except ImportError:
        assert probe_cuda_aware_mpi(env) is False
