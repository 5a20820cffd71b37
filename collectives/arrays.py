"""Array plumbing: accept NumPy, CuPy, torch, or anything with DLPack / __cuda_array_interface__."""
import functools

import numpy as np

__all__ = ["as_array", "array_module", "is_device_array", "is_torch_tensor", "cupy_or_none", "gpu_available",
           "to_torch", "wrap_like", "returns_input_type", "torch_cuda_device", "caller_stream", "on_torch_stream"]

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
    if is_torch_tensor(x):
        return _torch_view(x)
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


def is_torch_tensor(x):
    """True for torch.Tensor and its subclasses (nn.Parameter), checked without importing torch."""
    return any(c.__module__.split(".")[0] == "torch" and c.__name__ == "Tensor" for c in type(x).__mro__)


def _torch_view(t):
    """Zero-copy NumPy (CPU) or CuPy (CUDA) view of a torch tensor; bfloat16 travels as int16 bits.

    DLPack has no bfloat16 in NumPy's importer ("Unsupported dtype in DLTensor"), so the bits are
    exported as int16 and reinterpreted as ml_dtypes.bfloat16: same memory, same bytes.
    """
    if t.requires_grad:
        raise TypeError("a torch tensor that requires grad cannot be a collective buffer (the result would bypass "
                        "autograd): pass t.detach(), which shares its memory, so an in-place result writes through")
    bf16 = str(t.dtype) == "torch.bfloat16"
    src = t.view(_torch().int16) if bf16 else t
    if t.device.type == "cuda":
        import cupy
        a = cupy.from_dlpack(src)
    else:
        a = np.from_dlpack(src)
    if not bf16:
        return a
    from ml_dtypes import bfloat16
    try:
        return a.view(bfloat16)
    except Exception as exc:  # CuPy has no bfloat16 dtype (kernels take bf16 as uint16 bits)
        raise TypeError(f"bfloat16 {t.device.type} tensors need an array type with bfloat16; {type(a).__module__} "
                        f"refused it ({exc}): cast to float32 or use allreduce_fp8") from exc


def _torch():
    import torch
    return torch


def to_torch(a):
    """A torch tensor sharing ``a``'s memory (NumPy -> CPU tensor, CuPy -> CUDA tensor); bf16 kept."""
    torch = _torch()
    bf16 = str(a.dtype) == "bfloat16"
    bits = a.view(np.int16) if bf16 else a
    t = torch.from_dlpack(bits) if is_device_array(a) else torch.from_numpy(bits)
    return t.view(torch.bfloat16) if bf16 else t


def wrap_like(original, result, out=None):
    """``result`` in the caller's array type: ``out`` itself when it is a torch tensor, a torch tensor
    (same memory) when ``original`` is one and ``out`` is None, else ``result`` unchanged."""
    if out is not None:
        return out if is_torch_tensor(out) else result
    return to_torch(result) if is_torch_tensor(original) and not is_torch_tensor(result) else result


def returns_input_type(collective):
    """Decorator for ``collective(x, out=None, ...)``: its result comes back in ``x``'s array type
    (torch in, torch out; ``out`` itself when it is a torch tensor) via ``wrap_like``; with a CUDA tensor
    it runs on torch's current stream (``on_torch_stream``), so it is ordered and graph-captured there."""
    @functools.wraps(collective)
    def call(x, *args, **kwargs):
        out = kwargs.get("out", args[0] if args else None)
        device = torch_cuda_device(x, out)
        if device is None:
            return wrap_like(x, collective(x, *args, **kwargs), out)
        with on_torch_stream(device):
            return wrap_like(x, collective(x, *args, **kwargs), out)
    return call


# ---- streams: a collective on torch CUDA tensors is ordered on torch's current stream ------------------

def torch_cuda_device(*xs):
    """The ``torch.device`` of the first CUDA torch tensor among ``xs``, else None (no torch import)."""
    for t in xs:
        if t is not None and is_torch_tensor(t) and t.device.type == "cuda":
            return t.device
    return None


_external = {}   # (stream handle, device id) -> cupy stream object wrapping torch's stream (not owning it)


def _torch_stream_as_cupy(device):
    """torch.cuda.current_stream(device) as a CuPy stream (the legacy default stream is CuPy's null stream)."""
    import cupy
    handle = _torch().cuda.current_stream(device).cuda_stream
    key = (handle, device.index)
    stream = _external.get(key)
    if stream is None:
        if len(_external) > 64:
            _external.clear()
        stream = _external[key] = cupy.cuda.Stream.null if handle == 0 else \
            cupy.cuda.ExternalStream(handle, device.index if device.index is not None else -1)
    return stream


class on_torch_stream:
    """``with on_torch_stream(device):`` CuPy's current device and stream are torch's current ones on
    ``device``: every kernel, copy and event of the collective then goes to the caller's torch stream
    (under ``torch.cuda.graph`` that is the capture stream), and DLPack views need no cross-stream wait."""

    __slots__ = ("device", "_dev", "_stream")

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import cupy
        self._dev = cupy.cuda.Device(_cuda_index(self.device))
        self._dev.__enter__()
        self._stream = caller_stream(self.device)
        self._stream.__enter__()
        return self._stream

    def __exit__(self, *exc):
        try:
            self._stream.__exit__(*exc)
        finally:
            self._dev.__exit__(*exc)


def _cuda_index(device):
    """The GPU index of a torch CUDA device ("cuda" alone means torch's current device)."""
    return device.index if device.index is not None else _torch().cuda.current_device()


def caller_stream(device=None):
    """The CuPy stream that orders a caller's work: torch's current stream on ``device`` (a ``torch.device``,
    from ``torch_cuda_device``), or CuPy's current stream when ``device`` is None."""
    if device is not None:
        return _torch_stream_as_cupy(_torch().device("cuda", _cuda_index(device)))
    import cupy
    return cupy.cuda.get_current_stream()


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
