"""The device ring on a real GPU (marked gpu): PTX scopes, bit-exact vs the host ring, graphs, stalled peer."""
import pytest

from ringlab.arrays import gpu_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a usable CUDA GPU")]


def test_ptx_uses_system_scope_acquire_release():
    from ringlab.kernels.ring_kernel import ring_kernel
    kern = ring_kernel("float32", "sum")
    ptx = next(iter(kern.inspect_asm().values()))
    for needle in ("ld.acquire.sys.global.u64", "st.release.sys.global.u64", "fence.acq_rel.sys", "%globaltimer"):
        assert needle in ptx, needle


@pytest.mark.parametrize("k", [1, 2, 3, 8])
def test_device_ring_matches_host_ring_bitwise(run_mpi, k):
    out = run_mpi(k, "tests/mpi/device_ring_check.py", timeout=600).stdout
    assert f"device_ring_check OK: N={k}" in out


def test_stalled_peer_gives_timeout_naming_it(run_mpi):
    out = run_mpi(3, "tests/mpi/device_ring_check.py", "--stall", "--mode", "per-rank", timeout=300,
                  env={"RINGLAB_ABORT_ON_TIMEOUT": "0"}).stdout
    assert "device_ring_check stall OK" in out
