"""The stream binding of collectives on torch CUDA tensors, on CPU with stand-ins for torch.cuda and CuPy:
the collective runs with CuPy's current stream = torch's current stream (by handle), and gets its device."""
import sys
import types

import pytest

from ringlab import arrays


class _Stream:
    """A CuPy stream stand-in: ``with stream:`` makes it current, as CuPy's streams do."""
    current = []

    def __init__(self, ptr, device_id=-1):
        self.ptr, self.device_id = ptr, device_id

    def __enter__(self):
        _Stream.current.append(self)
        return self

    def __exit__(self, *exc):
        _Stream.current.pop()


class _Device:
    used = []

    def __init__(self, index):
        self.id = index

    def __enter__(self):
        _Device.used.append(self.id)

    def __exit__(self, *exc):
        _Device.used.pop()


@pytest.fixture
def fakes(monkeypatch):
    handle = {"ptr": 0xBEEF}
    cuda = types.SimpleNamespace(ExternalStream=_Stream, Device=_Device,
                                 Stream=types.SimpleNamespace(null=_Stream(0)),
                                 get_current_stream=lambda: _Stream.current[-1] if _Stream.current else None)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    torch_cuda = types.SimpleNamespace(current_stream=lambda device: types.SimpleNamespace(cuda_stream=handle["ptr"]),
                                       current_device=lambda: 0)
    fake_torch = types.SimpleNamespace(cuda=torch_cuda, device=lambda kind, index: types.SimpleNamespace(
        type=kind, index=index))
    monkeypatch.setattr(arrays, "_torch", lambda: fake_torch)
    monkeypatch.setattr(arrays, "_external", {})
    _Stream.current.clear()
    return handle


def _tensor(kind="cuda", index=1):
    Tensor = type("Tensor", (), {"__module__": "torch"})
    t = Tensor()
    t.device = types.SimpleNamespace(type=kind, index=index)
    return t


def test_collective_on_a_cuda_tensor_runs_on_torchs_current_stream(fakes):
    seen = []

    @arrays.returns_input_type
    def collective(x, out=None):
        seen.append((_Stream.current[-1].ptr, _Stream.current[-1].device_id, _Device.used[-1]))
        return out

    t = _tensor(index=1)
    assert collective(t, out=t) is t
    assert seen == [(0xBEEF, 1, 1)]
    assert not _Stream.current and not _Device.used          # restored afterwards
    fakes["ptr"] = 0                                          # torch's default stream: CuPy's null stream
    collective(t, out=t)
    assert seen[-1][0] == 0
    assert arrays.caller_stream(t.device).ptr == 0


def test_an_out_tensor_binds_too_and_host_calls_do_not(fakes):
    seen = []

    @arrays.returns_input_type
    def collective(x, out=None):
        seen.append(_Stream.current[-1].ptr if _Stream.current else None)
        return out if out is not None else x

    import numpy as np
    host = np.ones(3, np.float32)
    collective(host)                                         # no torch: nothing bound, nothing imported
    collective(host, out=_tensor(index=0))                   # a CUDA tensor as out orders on torch's stream
    collective(_tensor(kind="cpu"))                          # a CPU tensor: nothing bound
    assert seen == [None, 0xBEEF, None]
    assert arrays.torch_cuda_device(host, None) is None
