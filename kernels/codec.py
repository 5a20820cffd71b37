"""FP8 chunk codecs: how one chunk becomes a wire message and back, on the host or on the GPU."""
# A chunk of ``count`` elements travels as one message: ``count`` FP8 codes, padding to 4 bytes,
# then ``ceil(count / block)`` fp32 scales (``fp8_message_nbytes``). The collectives in
# collectives/fp8.py walk their schedule and call only these methods, so the same executor runs on
# NumPy (``HostFp8Codec``: ml_dtypes references) and on CuPy buffers (``DeviceFp8Codec``: the numba
# kernels, messages staged through pinned host memory because the MPI need not be CUDA-aware).

import numpy as np

from ringlab.kernels.formats import check_block, fp8_format
from ringlab.kernels.reference import (dequant_accumulate_reference, dequant_add_requant_reference, dequantize_fp8_blockwise,
                        fp8_message_nbytes, quantize_fp8_blockwise, split_fp8_message)

__all__ = ["HostFp8Codec", "DeviceFp8Codec", "codec_for", "PIECE_BLOCKS"]

# The host codec works through a chunk PIECE_BLOCKS blocks at a time: blocks are independent (one scale
# each), so the bytes are those of one whole-chunk call, while the fp32 temporaries stay a few pieces
# (about 64 KB each) instead of several chunk-sized arrays (the FP8 collectives' peak memory, issue 15).
PIECE_BLOCKS = 128


def _pieces(count, block):
    """(p0, p1, b0, b1): element and block ranges of consecutive block-aligned pieces of a chunk."""
    step = max(1, PIECE_BLOCKS) * block
    if count <= step:
        return [(0, count, 0, -(-count // block))]
    return [(p0, min(p0 + step, count), p0 // block, -(-min(p0 + step, count) // block))
            for p0 in range(0, count, step)]


class HostFp8Codec:
    """NumPy/ml_dtypes codec; messages are host uint8 arrays sent as they are."""

    xp = np

    def __init__(self, fmt="e4m3", block=128):
        self.fmt, self.block = fp8_format(fmt), check_block(block)

    def nbytes(self, count):
        return fp8_message_nbytes(count, self.block)

    def message(self, count):
        """A message buffer for up to ``count`` elements."""
        return self.xp.zeros(self.nbytes(count), dtype=np.uint8)

    def _split(self, msg, count):
        return split_fp8_message(msg, count, self.block)

    def quantize(self, x, msg):
        codes, scales = self._split(msg, x.size)
        for p0, p1, b0, b1 in _pieces(x.size, self.block):
            quantize_fp8_blockwise(x[p0:p1], self.fmt, self.block, codes=codes[p0:p1], scales=scales[b0:b1])

    def dequantize(self, msg, out):
        codes, scales = self._split(msg, out.size)
        for p0, p1, b0, b1 in _pieces(out.size, self.block):
            dequantize_fp8_blockwise(codes[p0:p1], scales[b0:b1], self.fmt, self.block, out=out[p0:p1])

    def hop(self, local, peer_msg, new_msg, out=None, divide_by=1):
        """new_msg = quantize((local + dequantize(peer_msg)) / divide_by); out = dequantize(new_msg)."""
        codes, scales = self._split(peer_msg, local.size)
        new_codes, new_scales = self._split(new_msg, local.size)
        for p0, p1, b0, b1 in _pieces(local.size, self.block):
            c, s = dequant_add_requant_reference(local[p0:p1], codes[p0:p1], scales[b0:b1], self.fmt, self.block,
                                                 divide_by, out=None if out is None else out[p0:p1])
            new_codes[p0:p1] = c
            new_scales[b0:b1] = s

    def accumulator(self, x, into=None):
        """An fp32 copy of ``x`` to accumulate dequantized peers into: ``into`` itself when it is a host
        fp32 array (the owner's slice of the output: no extra chunk), else a new array."""
        if into is not None and into.dtype == np.float32 and isinstance(into, np.ndarray):
            if into.ctypes.data != x.ctypes.data:      # out is x: the slice already holds the addend
                into[...] = x
            return into
        return x.astype(np.float32, copy=True)

    def accumulate(self, acc, peer_msg):
        codes, scales = self._split(peer_msg, acc.size)
        for p0, p1, b0, b1 in _pieces(acc.size, self.block):
            dequant_accumulate_reference(acc[p0:p1], codes[p0:p1], scales[b0:b1], self.fmt, self.block)

    def exchange(self, transport, send_msg, send_count, dest, recv_msg, recv_count, source, what=""):
        """Send the first message to ``dest`` while receiving one from ``source`` (raw bytes)."""
        transport.sendrecv(send_msg[: self.nbytes(send_count)], dest, recv_msg[: self.nbytes(recv_count)],
                           source, what=what)


class DeviceFp8Codec(HostFp8Codec):
    """numba-CUDA kernels on CuPy buffers; each exchange copies the messages through pinned host memory,
    or (``staged=False``, for a CUDA-aware MPI) hands the device messages to MPI directly."""

    def __init__(self, fmt="e4m3", block=128, staged=True):
        super().__init__(fmt, block)
        self.staged = staged
        import cupy
        import cupyx
        from ringlab.kernels import fp8 as kernels_fp8
        self.xp, self._k, self._cupyx = cupy, kernels_fp8, cupyx
        self._host = {}

    def _pinned(self, key, nbytes):
        buf = self._host.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = self._cupyx.empty_pinned(max(nbytes, 1), dtype=np.uint8)
            self._host[key] = buf
        return buf[:nbytes]

    def quantize(self, x, msg):
        codes, scales = self._split(msg, x.size)
        self._k.quantize_device(x, codes, scales, self.fmt, self.block)

    def dequantize(self, msg, out):
        codes, scales = self._split(msg, out.size)
        self._k.dequantize_device(codes, scales, out, self.fmt, self.block)

    def hop(self, local, peer_msg, new_msg, out=None, divide_by=1):
        codes, scales = self._split(peer_msg, local.size)
        new_codes, new_scales = self._split(new_msg, local.size)
        self._k.dequant_add_requant_device(local, codes, scales, new_codes, new_scales, self.fmt, self.block,
                                           out=out, divide_by=divide_by)

    def accumulator(self, x, into=None):
        return x.astype(np.float32, copy=True) if str(x.dtype) != "bfloat16" else self._bf16_to_f32(x)

    def _bf16_to_f32(self, x):
        return (x.view(np.uint16).astype(np.uint32) << 16).view(np.float32)

    def accumulate(self, acc, peer_msg):
        codes, scales = self._split(peer_msg, acc.size)
        self._k.dequant_accumulate_device(acc, codes, scales, self.fmt, self.block)

    def exchange(self, transport, send_msg, send_count, dest, recv_msg, recv_count, source, what=""):
        ns, nr = self.nbytes(send_count), self.nbytes(recv_count)
        if not self.staged:
            self.xp.cuda.get_current_stream().synchronize()     # the kernel that wrote send_msg is done
            transport.sendrecv(send_msg[:ns], dest, recv_msg[:nr], source, what=what)
            return
        host_send, host_recv = self._pinned("send", ns), self._pinned("recv", nr)
        send_msg[:ns].get(out=host_send)      # blocking copy: the kernel that wrote the message is done
        transport.sendrecv(host_send, dest, host_recv, source, what=what)
        recv_msg[:nr].set(host_recv)


def codec_for(array, fmt="e4m3", block=128):
    """The codec for where ``array`` lives: DeviceFp8Codec for CuPy arrays, else HostFp8Codec."""
    if type(array).__module__.split(".")[0] == "cupy":
        return DeviceFp8Codec(fmt, block)
    return HostFp8Codec(fmt, block)
