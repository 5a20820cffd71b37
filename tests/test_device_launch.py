"""The lean kernel launcher packs a 1-D array as numba's kernel ABI does (7 parameters), scalars as ctypes.

On a GPU it is also checked against numba's own ``_prepare_args`` before first use (kernels/device.py)
and by tests/test_gpu.py; here, without one, the layout itself."""
import ctypes
from types import SimpleNamespace

from ringlab import kernels

kernels.use_simulator_without_gpu()


def _fake_cupy(size, itemsize, ptr):
    return SimpleNamespace(size=size, itemsize=itemsize, data=SimpleNamespace(ptr=ptr))


def test_packers_follow_the_argument_types():
    from numba.cuda import types as nt

    from ringlab.kernels.device import _LeanLauncher
    overload = SimpleNamespace(argument_types=(nt.Array(nt.float32, 1, "C"), nt.int64, nt.float32, nt.boolean))
    packers = _LeanLauncher._packers(overload)
    assert packers[0] is None and packers[1] is ctypes.c_int64 and packers[2] is ctypes.c_float
    assert packers[3](True) is True
    two_d = SimpleNamespace(argument_types=(nt.Array(nt.float32, 2, "C"),))
    assert _LeanLauncher._packers(two_d) is None          # not 1-D C: numba's own launch


def test_params_layout_per_array_and_scalar():
    from numba.cuda import types as nt

    from ringlab.kernels.device import _LeanLauncher
    lean = object.__new__(_LeanLauncher)
    lean.packers = _LeanLauncher._packers(SimpleNamespace(
        argument_types=(nt.Array(nt.float32, 1, "C"), nt.Array(nt.uint8, 1, "C"), nt.int64)))
    got = lean.params([_fake_cupy(10, 4, 0x1000), _fake_cupy(0, 1, 0x2000), 7])
    assert got[:7] == [0, 0, 10, 4, 0x1000, 10, 4]        # meminfo, parent, size, itemsize, data, shape, stride
    assert got[7:14] == [0, 0, 0, 1, 0, 0, 1]             # an empty array passes a null pointer
    assert isinstance(got[14], ctypes.c_int64) and got[14].value == 7
