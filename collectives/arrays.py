"""Array plumbing: accept NumPy, CuPy, or anything with DLPack / __cuda_array_interface__."""
import numpy as np

__all__ = ["as_array", "array_module", "is_device_array", "cupy_or_none", "gpu_available"]

_cupy = None
_cupy_checked = False


def cupy_or_none():
    """The cupy module if it imports and a CUDA device is usable, else None (checked once)."""
    global _cupy, _cupy_checked
    if not _cupy_checked:
        _cupy_checked = True
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                _cupy = cupy
        except Exception:  # no cupy, no driver, no device: the CPU path is the default
            _cupy = None
    return _cupy


def gpu_available():
    return cupy_or_none() is not None


def is_device_array(a):
    return type(a).__module__.split(".")[0] == "cupy"


def array_module(a):
    """numpy or cupy, whichever owns ``a``."""
    if is_device_array(a):
        import cupy
        return cupy
    return np


def as_array(x):
    """Zero-copy view of ``x`` as a numpy.ndarray or cupy.ndarray.

    torch tensors and other DLPack / CUDA-array-interface producers are wrapped without copying,
    so an in-place collective writes through to the caller's tensor.
    """
    if isinstance(x, np.ndarray) or is_device_array(x):
        return x
    if hasattr(x, "__cuda_array_interface__"):
        import cupy
        return cupy.asarray(x)
    if hasattr(x, "__dlpack_device__"):
        dev_type, _ = x.__dlpack_device__()
        if dev_type in (2, 3, 13):  # kDLCUDA, kDLCUDAHost, kDLCUDAManaged
            import cupy
            return cupy.from_dlpack(x)
        return np.from_dlpack(x)
    if hasattr(x, "__array_interface__") or hasattr(x, "__array__"):
        a = np.asarray(x)
        return a
    raise TypeError(f"cannot use {type(x).__name__} as a buffer: expected a NumPy/CuPy array, "
                    "a DLPack tensor or an object with __cuda_array_interface__")


def local_rank(comm):
    """Rank within this node (ranks sharing memory), from MPI's shared-memory split."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return node.rank, node.size
    finally:
        node.Free()


def use_local_gpu(comm):
    """Bind this rank to GPU (local rank) % (GPU count) and return that device id.

    So ``mpirun -n 8`` runs on a 1-GPU box (8 ranks share it) and on an 8-GPU box (one each).
    """
    cupy = cupy_or_none()
    if cupy is None:
        raise RuntimeError("no usable GPU: install ringlab[gpu] on a CUDA machine, or use --backend numpy")
    lr, _ = local_rank(comm)
    dev = lr % cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(dev).use()
    return dev
