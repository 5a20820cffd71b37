"""The persistent-kernel executors' shared host side (gpu/persistent.py), on CPU with stand-ins for CuPy and the
communicator: check()'s timeout messages, synchronize, the table cache's capture refusal and eviction, the probe."""
import sys
import types

import numpy as np
import pytest

from ringlab import faults
from ringlab.errors import CollectiveTimeout
from ringlab.gpu import persistent
from ringlab.gpu.device_fp8 import DeviceFp8Ring
from ringlab.gpu.device_ring import DeviceRing
from ringlab.gpu.device_small import DeviceSmallAllreduce


class _Stream:
    def __init__(self, capturing=False):
        self.capturing, self.synced = capturing, 0

    def is_capturing(self):
        return self.capturing

    def synchronize(self):
        self.synced += 1


@pytest.fixture
def cupy(monkeypatch):
    """A CuPy stand-in: a current stream, asarray (tags the table as uploaded), memset / deviceSynchronize logs."""
    log = []
    stream = _Stream()
    runtime = types.SimpleNamespace(memset=lambda ptr, value, nbytes: log.append(("memset", ptr, value, nbytes)),
                                    deviceSynchronize=lambda: log.append(("sync",)))
    cuda = types.SimpleNamespace(get_current_stream=lambda: stream, runtime=runtime,
                                 Device=lambda: types.SimpleNamespace(pci_bus_id="0000:01:00.0"))
    fake = types.SimpleNamespace(cuda=cuda, asarray=lambda a: ("uploaded", a), stream=stream, log=log)
    monkeypatch.setitem(sys.modules, "cupy", fake)
    return fake


@pytest.fixture
def raised():
    """Timeouts handed to the policy (recorded, then raised to the caller: no abort)."""
    seen = []
    previous = faults.set_timeout_handler(seen.append)
    yield seen
    faults.set_timeout_handler(previous)


def _executor(cls, status=(0, 0, 0, 0), **attrs):
    ex = object.__new__(cls)                     # no GPU: only what the shared methods read
    ex.rank, ex.n, ex.timeout, ex.fallback, ex._keep = 1, 3, 2.0, None, []
    ex.status = np.array(status, np.uint64)
    for k, v in attrs.items():
        setattr(ex, k, v)
    return ex


@pytest.mark.parametrize("cls, attrs, status, where", [
    (DeviceRing, {}, (1, 2, 3, 0), "device ring kernel gave up after 2.0 s waiting for rank 2 (primitive 3)"),
    (DeviceFp8Ring, {"algo": "fp8-ring"}, (1, 0, 4, 0),
     "device fp8-ring kernel gave up after 2.0 s waiting for rank 0 (primitive 4)"),
    (DeviceFp8Ring, {"algo": "fp8-direct"}, (1, 2, 1, 0),
     "device fp8-direct kernel gave up after 2.0 s waiting for rank 2 (phase 1)"),
    (DeviceSmallAllreduce, {"algo": "oneshot"}, (1, 2, 1, 7),
     "device oneshot kernel gave up after 2.0 s waiting for rank 2 (waiting for its input, call 7)"),
    (DeviceSmallAllreduce, {"algo": "twoshot"}, (1, 0, 2, 5),
     "device twoshot kernel gave up after 2.0 s waiting for rank 0 (waiting for its reduced chunk, call 5)"),
    (DeviceSmallAllreduce, {"algo": "twoshot"}, (1, 0, 9, 5),
     "device twoshot kernel gave up after 2.0 s waiting for rank 0 (phase 9, call 5)"),
])
def test_check_raises_the_kernels_timeout_naming_peer_and_where(raised, cls, attrs, status, where):
    ex = _executor(cls, status, **attrs)
    with pytest.raises(CollectiveTimeout) as info:
        ex.check()
    assert str(info.value) == f"rank 1: {where}; the communicator is unusable now"
    assert (info.value.peer, info.value.rank) == (int(status[1]), 1)
    assert raised == [info.value]                 # the timeout policy saw it first


def test_check_is_quiet_when_ok_or_on_the_fallback(raised):
    _executor(DeviceRing).check()
    _executor(DeviceRing, (1, 2, 3, 0), fallback=object()).check()      # the fallback reports its own timeouts
    assert raised == []


def test_synchronize_waits_for_the_stream_then_checks(cupy, raised):
    ex = _executor(DeviceSmallAllreduce, algo="oneshot")
    ex.synchronize()
    assert cupy.stream.synced == 1
    ex.status[:] = (1, 2, 1, 3)
    with pytest.raises(CollectiveTimeout, match="waiting for rank 2"):
        ex.synchronize()
    assert cupy.stream.synced == 2


@pytest.mark.parametrize("cls, name", [(DeviceRing, "device ring"), (DeviceFp8Ring, "device FP8 all-reduce")])
def test_cached_refuses_an_upload_during_capture(cupy, cls, name):
    ex, cache = _executor(cls), {}
    cupy.stream.capturing = True
    with pytest.raises(RuntimeError) as info:
        ex._cached(cache, "k", np.zeros(3))
    assert str(info.value) == (f"{name}: the first call with these buffers (or this size) cannot be captured in a "
                               "CUDA graph (it uploads a table); run it once before capturing")
    with pytest.raises(RuntimeError, match="cannot be captured"):      # the stream passed in decides
        ex._cached(cache, "k", np.zeros(3), _Stream(capturing=True))
    assert cache == {}
    assert ex._cached(cache, "k", np.zeros(3), _Stream())[0] == "uploaded"


def test_cached_evicts_to_keep_beyond_64_entries(cupy):
    ex, cache = _executor(DeviceRing), {}
    for k in range(persistent.CACHE_ENTRIES + 1):
        ex._cached(cache, k, k)
    assert len(cache) == 65 and ex._keep == []
    table = ex._cached(cache, "next", "t")
    assert cache == {"next": table} and table == ("uploaded", "t")
    assert len(ex._keep) == 1 and len(ex._keep[0]) == 65            # still referenced: a queued kernel may read them
    for round_ in range(3):
        for k in range(65):
            ex._cached(cache, (round_, k), k)
    assert len(ex._keep) == 2                                        # the last two generations only


class _Comm:
    """One rank's communicator (the collectives of the probe as their one-rank results)."""

    def __init__(self):
        self.size, self.rank, self.calls = 1, 0, []

    def Barrier(self):
        self.calls.append("Barrier")

    def allgather(self, x):
        self.calls.append("allgather")
        return [x]

    def allreduce(self, x, op=None):
        self.calls.append("allreduce")
        return x


@pytest.mark.parametrize("span_ns, result, mode, why", [
    (40_000, True, "per-rank", "kernels co-run (probe: 40 us after the last start)"),
    (9_000_000, True, "fallback", "no co-residency: MPS not running? (probe span 9000 us, MPS pipe visible: "),
    (40_000, False, "fallback", "probe timed out (probe span 0 us, MPS pipe visible: "),
])
def test_probe_modes_and_the_reset_before_a_fallback(cupy, span_ns, result, mode, why):
    ex = _executor(DeviceRing, comm=_Comm(), trace=np.zeros(4, np.uint64))
    launched, loaded = [], []

    def launch():
        ex.trace[0], ex.trace[3] = 1000, 1000 + span_ns
        launched.append(1)
    got, said, ok = persistent.probe(ex, "fallback", launch, lambda: result, 3, [(0xA0, 16), (0xB0, 8)],
                                     lambda: loaded.append(ex.comm.calls[:]))
    assert (got, ok) == (mode, result) and said.startswith(why)
    assert loaded == [[]] and len(launched) == (2 if result else 1)      # loaded before the first barrier
    if mode == "per-rank":
        assert cupy.log == []
    else:
        assert cupy.log == [("memset", 0xA0, 0, 16), ("memset", 0xB0, 0, 8), ("sync",)]
        assert not ex.status.any() and ex.comm.calls[-1] == "Barrier"


def test_probe_without_a_trial_call_agrees_on_ok(cupy):
    ex = _executor(DeviceFp8Ring, comm=_Comm(), algo="fp8-ring")
    assert persistent.probe(ex, "host", None, None, 1, [], agree_ok=True) == \
        ("per-rank", "kernels co-run (probe: 0 us after the last start)", True)
    assert ex.comm.calls == ["allreduce", "allreduce"]


def test_executors_stay_siblings_and_driver_launch_is_reexported():
    from ringlab.gpu import device_ring
    assert device_ring.DriverLaunch is persistent.DriverLaunch
    assert (device_ring.mps_visible, device_ring.PROBE_LIMIT_NS) == (persistent.mps_visible, persistent.PROBE_LIMIT_NS)
    for cls in (DeviceRing, DeviceFp8Ring, DeviceSmallAllreduce):
        assert cls.__bases__ == (object,) and cls.check is persistent.check, cls
