"""ringlab kernels: reduce and FP8 (de)quantize, as NumPy references and numba-CUDA kernels."""
# ``import ringlab.kernels`` never needs CUDA or numba: the NumPy references (``kernels.reference``) and the
# FP8 formats load eagerly, the numba-CUDA modules (``kernels.reduce``, ``kernels.fp8``) only when first
# used, so a CPU machine without a GPU imports this package fine. numba-cuda 0.30.x registers
# ``np.row_stack``, which NumPy 2.5 removed; ``patch_numpy_for_numba`` restores it as ``np.vstack``
# (its documented equivalent) before numba is imported.

import importlib
import os

import numpy as np

from ringlab.kernels.formats import BLOCK_SIZES, FP8_FORMATS, Fp8Format, check_block, check_fp8_input_dtype, fp8_format
from ringlab.kernels.reference import (dequant_accumulate_reference, dequant_add_requant_reference, dequantize_fp8_blockwise,
                        fp8_message_nbytes, quantize_fp8_blockwise, reduce_reference, split_fp8_message)

__all__ = ["BLOCK_SIZES", "FP8_FORMATS", "Fp8Format", "fp8_format", "check_block", "check_fp8_input_dtype",
           "quantize_fp8_blockwise", "dequantize_fp8_blockwise", "dequant_add_requant_reference",
           "dequant_accumulate_reference", "reduce_reference", "fp8_message_nbytes", "split_fp8_message",
           "patch_numpy_for_numba", "use_simulator_without_gpu"]


def patch_numpy_for_numba():
    """Give NumPy >= 2.5 back ``np.row_stack`` (= ``np.vstack``) so numba-cuda 0.30.x imports."""
    if not hasattr(np, "row_stack"):
        np.row_stack = np.vstack


def use_simulator_without_gpu():
    """Select numba's CUDA simulator when no NVIDIA device node exists (tests on CPU machines).

    Only effective before numba.cuda is first imported; an explicit NUMBA_ENABLE_CUDASIM wins.
    Returns True when the simulator is (or will be) used.
    """
    if "NUMBA_ENABLE_CUDASIM" not in os.environ and not os.path.exists("/dev/nvidia0"):
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def __getattr__(name):
    # Lazy: the numba-CUDA modules import numba (and compile on first launch) only when asked for.
    if name in ("reduce", "fp8", "device", "codec"):
        patch_numpy_for_numba()
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'ringlab.kernels' has no attribute {name!r}")
