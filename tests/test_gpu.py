"""Device transports (IPC ring, host staging) on a real GPU; skipped without one."""
import pytest

from ringlab.arrays import gpu_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA GPU")]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_ipc_and_staged_transports_match_reference(run_mpi, k):
    out = run_mpi(k, "tests/mpi/gpu_check.py", "ipc-shared,ipc,ipc:3,ipc-host,staged,oneshot,twoshot", f"0,1,{max(k - 1, 1)},1009,100003",
                  timeout=900).stdout
    assert f"gpu_check OK: N={k}" in out


def test_main_command_on_gpu(run_mpi):
    out = run_mpi(4, "experiments/ring.py", "--sizes", "1M", "--iters", "3", timeout=600).stdout
    assert "transport: ipc" in out and "FAIL" not in out
    assert "n/a: NCCL needs one GPU per rank" in out or " nccl " in out


@pytest.mark.parametrize("k", [2, 3])
def test_fp8_allreduce_device_transports_match_numpy(run_mpi, k):
    """allreduce_fp8 on CuPy buffers over IPC (the FP8 ring) and staging equals the NumPy path bit for bit."""
    out = run_mpi(k, "experiments/device_kernels_check.py", "--no-check", "--no-speed", timeout=900).stdout
    assert "ring via    ipc" in out and "ALL PASS" in out


def test_every_numba_launch_path_gives_the_reference_results(run_mpi):
    """numba's dispatcher, the cached overload and the lean parameter packer: each kernel's result checked."""
    out = run_mpi(1, "experiments/launch_overhead.py", "--calls", "5", timeout=600).stdout
    assert "lean packer" in out and "ALL PASS" in out
