"""FP8-compressed all-reduce: the ring with FP8 payloads, and a direct variant whose error does not grow with N.

Both send FP8 codes + one fp32 scale per block (kernels/codec.py) and accumulate in fp32 locally.

``fp8-ring`` (algo="fp8-ring"): the ring of ring.py, but every hop re-quantizes the partial sum it forwards

    reduce-scatter step s: rank r sends Q(p) of chunk (r-s), receives chunk (r-s-1) from r-1 and
    computes p = x[chunk] + D(received) in fp32 -> the chunk is quantized N-1 times on its way
    (Q of 1, 2, ..., N addends), so the error grows with N (about sqrt(N) for random data).
    all-gather: the owner quantizes its final sum once, keeps D(Q(sum)) itself and forwards the
    same bytes around the ring; nobody re-quantizes, so all ranks end bitwise identical.

``fp8-direct`` (algo="fp8-direct", ZeRO++ qgZ style; not the host algorithm "direct"): rank r quantizes its copy of chunk j once and sends
it straight to rank j (N-1 pairwise exchanges, round k: send to r+k, receive from r-k); the owner
adds the N-1 dequantized copies to its own exact chunk in fp32, quantizes the sum once, and the
same FP8 all-gather follows. Every addend is quantized once: the error does not grow with N.
Bytes sent per rank are the same: 2(N-1) messages of about S/N elements each.
"""
import numpy as np
from mpi4py import MPI

from ringlab.kernels.codec import DeviceFp8Codec, codec_for
from ringlab.kernels.formats import check_block, check_fp8_input_dtype, fp8_format

from ringlab.api import _transport, collective_call, prepare_out, register_allreduce
from ringlab.arrays import as_array, is_device_array, returns_input_type
from ringlab.commstate import comm_state
from ringlab.gpu.device import cuda_aware_mpi, select_transport
from ringlab.ops import dtype_label
from ringlab.settings import parse_transport
from ringlab.schedule import chunk_bounds, ring_allgather_schedule, ring_reduce_scatter_schedule
from ringlab.transport import CudaAwareMpiTransport
from ringlab.validate import checked_call

__all__ = ["allreduce_fp8", "fp8_algo", "fp8_ring_allreduce", "fp8_direct_allreduce", "direct_exchange_schedule",
           "fp8_allreduce_error_bound", "FP8_ALGOS", "FP8_OPS"]

FP8_ALGOS = ("fp8-ring", "fp8-direct")
FP8_OPS = ("sum", "avg")
FP8_TRANSPORTS = ("auto", "device", "ipc", "mpi", "staged")


def direct_exchange_schedule(rank, nranks):
    """Rounds of the direct reduce-scatter: [(send_to, send_chunk, recv_from)], chunk j -> rank j.

    Round k = 1..N-1 pairs every rank with r+k (send) and r-k (receive), so each round is a
    permutation and all N-1 rounds together are an all-to-all without a hot spot.
    """
    return [((rank + k) % nranks, (rank + k) % nranks, (rank - k) % nranks) for k in range(1, nranks)]


def _copy_through(x, out):
    """One rank: nothing travels, the input is the result."""
    if out is not x:
        out[...] = x
    return out


def _message_pair(codec, bounds):
    largest = max(hi - lo for lo, hi in bounds)
    return codec.message(largest), codec.message(largest)


def _fp8_allgather(x_out, codec, transport, bounds, send, recv, rotate):
    """All-gather FP8 messages around the ring: ``send`` holds this rank's owned chunk's message.
    Every received message is decoded into place and forwarded unchanged."""
    comm = transport.comm
    for st in ring_allgather_schedule(comm.rank, comm.size, rotate):
        s0, s1 = bounds[st.send_chunk]
        r0, r1 = bounds[st.recv_chunk]
        codec.exchange(transport, send, s1 - s0, st.send_to, recv, r1 - r0, st.recv_from,
                       what=f"fp8 all-gather step {st.step}")
        codec.dequantize(recv[: codec.nbytes(r1 - r0)], x_out[r0:r1])
        send, recv = recv, send


# The two wire messages of a host call stay below this fraction of the input's bytes: a chunk whose messages
# would be larger (N = 2: a chunk is half the input) runs as several passes over block-aligned parts of every
# chunk. Blocks are chunk-local and independent, so the bytes are those of one pass (tests/test_fp8_mpi.py).
MESSAGE_BUDGET = 0.125


def _passes(count, n, codec, itemsize):
    """Chunk bounds per pass: [chunk_bounds(count, n)], or each chunk cut into block-aligned parts."""
    bounds = chunk_bounds(count, n)
    largest = max(hi - lo for lo, hi in bounds)
    budget = MESSAGE_BUDGET * count * itemsize
    if codec.xp is not np or 2 * codec.nbytes(largest) <= budget or largest <= codec.block:
        return [bounds]
    piece = max(codec.block, int(budget / 2 / (1 + 4 / codec.block)) // codec.block * codec.block)
    return [[(min(lo + p0, hi), min(lo + p0 + piece, hi)) for lo, hi in bounds] for p0 in range(0, largest, piece)]


def fp8_ring_allreduce(x, out, transport, codec, op="sum"):
    """Ring all-reduce of flat ``x`` into flat ``out`` (may be ``x``) with FP8 messages; see module doc."""
    if transport.comm.size == 1:
        return _copy_through(x, out)
    passes = _passes(x.size, transport.comm.size, codec, x.itemsize)
    send, recv = _message_pair(codec, passes[0])
    for bounds in passes:
        _fp8_ring_pass(x, out, transport, codec, op, bounds, send, recv)
    return out


def _fp8_ring_pass(x, out, transport, codec, op, bounds, send, recv):
    n, r = transport.comm.size, transport.comm.rank
    steps = ring_reduce_scatter_schedule(r, n)
    lo, hi = bounds[steps[0].send_chunk]
    codec.quantize(x[lo:hi], send[: codec.nbytes(hi - lo)])
    for st in steps:
        s0, s1 = bounds[st.send_chunk]
        r0, r1 = bounds[st.recv_chunk]
        codec.exchange(transport, send, s1 - s0, st.send_to, recv, r1 - r0, st.recv_from,
                       what=f"fp8 ring reduce-scatter step {st.step}")
        last = st.step == n - 2          # the chunk received last is the one this rank owns
        nb = codec.nbytes(r1 - r0)
        # send is free again (the exchange completed): the hop writes the next message into it.
        codec.hop(x[r0:r1], recv[:nb], send[:nb], out=out[r0:r1] if last else None,
                  divide_by=n if (last and op == "avg") else 1)
    _fp8_allgather(out, codec, transport, bounds, send, recv, rotate=0)


def fp8_direct_allreduce(x, out, transport, codec, op="sum"):
    """Direct-exchange (qgZ) reduce-scatter + FP8 ring all-gather; rank r owns chunk r; see module doc."""
    if transport.comm.size == 1:
        return _copy_through(x, out)
    passes = _passes(x.size, transport.comm.size, codec, x.itemsize)
    send, recv = _message_pair(codec, passes[0])
    for bounds in passes:
        _fp8_direct_pass(x, out, transport, codec, op, bounds, send, recv)
    return out


def _fp8_direct_pass(x, out, transport, codec, op, bounds, send, recv):
    n, r = transport.comm.size, transport.comm.rank
    lo, hi = bounds[r]
    acc = codec.accumulator(x[lo:hi], out[lo:hi])    # own addend, exact; in out's slice when out is fp32
    for k, (dest, chunk, source) in enumerate(direct_exchange_schedule(r, n)):
        c0, c1 = bounds[chunk]
        codec.quantize(x[c0:c1], send[: codec.nbytes(c1 - c0)])
        codec.exchange(transport, send, c1 - c0, dest, recv, hi - lo, source,
                       what=f"fp8 direct reduce-scatter round {k + 1}")
        codec.accumulate(acc, recv[: codec.nbytes(hi - lo)])
    if op == "avg":
        acc /= np.float32(n)
    nb = codec.nbytes(hi - lo)
    codec.quantize(acc, send[:nb])
    codec.dequantize(send[:nb], out[lo:hi])     # the owner keeps exactly what the others will decode
    _fp8_allgather(out, codec, transport, bounds, send, recv, rotate=-1)


_EXECUTORS = {"fp8-ring": fp8_ring_allreduce, "fp8-direct": fp8_direct_allreduce}
# allreduce_fp8's earlier algo names; "direct" alone also names the host all-to-all algorithm (algorithms.py)
_OLD_ALGO_NAMES = {"ring": "fp8-ring", "direct": "fp8-direct"}


def fp8_algo(algo):
    """The FP8 algorithm's name: "fp8-ring" or "fp8-direct" ("ring" and "direct" are accepted aliases)."""
    name = _OLD_ALGO_NAMES.get(algo, algo)
    if name not in FP8_ALGOS:
        raise ValueError(f"unknown FP8 algo {algo!r}; expected one of {', '.join(FP8_ALGOS)} "
                         "(the older names 'ring' and 'direct' still work)")
    return name


def fp8_transport(transport, a):
    """The FP8 route named by ``transport`` (settings.TRANSPORTS): None, 'auto', 'device', 'ipc', 'mpi' or 'staged'."""
    if transport is None:
        return None
    name, slices = parse_transport(transport)
    if name in ("ipc-host", "ipc-shared") or slices != 1:
        raise ValueError(f"transport {transport!r}: the FP8 ring over IPC has one flavour, 'ipc'; "
                         f"expected one of {', '.join(FP8_TRANSPORTS)}")
    if name not in ("auto", "mpi") and not is_device_array(a):
        raise ValueError(f"transport {transport!r} applies to CuPy arrays; NumPy arrays go over MPI")
    return name


@returns_input_type   # torch in, torch out (arrays.py)
def allreduce_fp8(x, out=None, op="sum", algo="fp8-ring", comm=None, timeout=None, *, fmt="e4m3", block=128,
                  validate=True, transport=None):
    """All-reduce ``x`` with FP8 (``fmt`` "e4m3" or "e5m2") payloads and one fp32 scale per ``block``.

    ``algo``: "fp8-ring" (error grows with N) or "fp8-direct" (N-independent error, same bytes). ``op``:
    sum or avg. Input float32, float16 or bfloat16 (NumPy, or CuPy via the numba kernels); the
    result has the input's dtype and is bitwise identical on every rank. ``out=x`` works in place.
    Inf/NaN inputs follow docs/fp8.md: NaN stays NaN, inf stays inf in E5M2 and becomes NaN in E4M3.
    ``transport`` (CuPy only): None/"auto" ("device" when all ranks share one GPU, else IPC for the ring when
    usable, else CUDA-aware MPI, else staging), "device" (persistent kernels: collectives/gpu/device_fp8.py),
    "ipc" (ring only: collectives/gpu/fp8_ipc.py), "mpi" (CUDA-aware), "staged" (pinned host).
    The result is bitwise the same on every transport.
    """
    comm = comm if comm is not None else MPI.COMM_WORLD
    box = []

    def local_checks():
        a = as_array(x)
        box.append(a)
        check_fp8_input_dtype(a.dtype)
        fp8_format(fmt)
        check_block(block)
        name = fp8_algo(algo)
        if op not in FP8_OPS:
            raise ValueError(f"FP8 all-reduce supports op {' or '.join(FP8_OPS)}, got {op!r}")
        route = fp8_transport(transport, a)
        if route == "ipc" and name != "fp8-ring":
            raise ValueError("transport 'ipc' carries the FP8 ring only; use transport 'staged' or 'mpi' for "
                             f"algo {algo!r}")
        box.append((name, route))
        return prepare_out(a, out, a.shape, "allreduce_fp8")

    def signature():
        a = box[0]
        return "allreduce_fp8", a.size, dtype_label(a.dtype), op, f"{algo}/{fmt}/{block} via {transport}", out is x
    with collective_call(comm, "allreduce_fp8", timeout) as call:
        res = checked_call(comm, validate, signature, local_checks, timeout, "allreduce_fp8", call)
        a, (name, transport) = box
        call.moving()
        if not a.flags.c_contiguous:
            a = a.copy()
        flat, flat_out = a.reshape(-1), res.reshape(-1)
        route = _device_route(comm, name, transport, flat.size) if is_device_array(a) else "host"
        if route == "device":
            from ringlab.gpu.device_fp8 import get_device_fp8_ring
            get_device_fp8_ring(comm, fmt, block, name, timeout).allreduce(flat, flat_out, op, timeout)
            return res
        if route == "ipc":
            from ringlab.gpu.fp8_ipc import get_fp8_ipc_ring
            get_fp8_ipc_ring(comm, fmt, block).allreduce(flat, flat_out, op, timeout)
            return res
        if route == "mpi":
            tr = _transport(comm, timeout, CudaAwareMpiTransport)
            codec = _device_codec(comm, fmt, block, staged=False)
        else:
            tr = _transport(comm, timeout, call=call)
            codec = codec_for(a, fmt, block) if route == "host" else _device_codec(comm, fmt, block, staged=True)
        _EXECUTORS[name](flat, flat_out, tr, codec, op)
        return res


def _device_route(comm, algo, transport, count):
    """'device', 'ipc', 'mpi' or 'staged' for CuPy buffers of ``count`` elements (the same answer on every rank)."""
    if transport in ("ipc", "device"):
        from ringlab.gpu.ipc import ipc_usable
        usable, why = ipc_usable(comm)
        if not usable:
            raise ValueError(f"transport {transport!r} needs CUDA IPC between all ranks, which is unusable here: {why}")
    if transport in ("device", "ipc", "mpi", "staged"):
        return transport
    name, _, _ = select_transport(comm, None)
    if name == "device":           # persistent kernels up to their buffers' capacity, the IPC ring above
        from ringlab.gpu.device_fp8 import DEFAULT_CAPACITY
        if count <= DEFAULT_CAPACITY:
            return "device"
    if name in ("device", "ipc", "ipc-shared", "ipc-host"):
        return "ipc" if algo == "fp8-ring" else ("mpi" if cuda_aware_mpi(comm) else "staged")
    return "mpi" if name == "mpi" else "staged"


def _device_codec(comm, fmt, block, staged):
    """One DeviceFp8Codec per communicator and (fmt, block, staged): its pinned buffers are reused."""
    state = comm_state(comm)
    key = ("fp8-codec", fp8_format(fmt).name, int(block), staged)
    if key not in state:
        state[key] = DeviceFp8Codec(fmt, block, staged=staged)
    return state[key]


def _registered(algo):
    def check(dtype, op):
        check_fp8_input_dtype(dtype)
        if op not in FP8_OPS:
            raise ValueError(f"{algo} supports op {' or '.join(FP8_OPS)}, got {op!r}")

    def run(buf, transport, op, cache):
        check(buf.dtype, op)
        _EXECUTORS[algo](buf, buf, transport, codec_for(buf), op)
    run.check = check      # api's local checks call it, so every rank rejects a bad call before data moves
    return run


for _algo in FP8_ALGOS:   # allreduce(x, algo="fp8-ring" | "fp8-direct"): E4M3, block 128
    register_allreduce(_algo, _registered(_algo))


def fp8_allreduce_error_bound(fmt, nranks, max_abs_input, algo="ring", op="sum"):
    """Worst-case |result - exact| per element when every input element satisfies |x| <= max_abs_input.

    One quantization of a block with amax A errs by at most u*A, u = 2**-(mbits+1) (half an ulp at
    the top binade; subnormals and saturation err less). Ring: the k-th quantization (k = 1..N, the
    last one for the all-gather) sees a partial sum of k addends plus the error E so far, so
    E <- E + u*(k*X + E). Direct: N-1 single addends (amax <= X), then the final sum. avg divides
    the sum's bound by N. 1% slack covers the fp32 arithmetic.
    """
    u = 2.0 ** -(fp8_format(fmt).mbits + 1)
    n, big = int(nranks), float(max_abs_input)
    if n == 1:
        return 0.0
    if fp8_algo(algo) == "fp8-ring":
        err = 0.0
        for k in range(1, n + 1):
            err += u * (k * big + err)
    else:
        err = (n - 1) * u * big
        err += u * (n * big + err)
    bound = 1.01 * err
    return bound / n if op == "avg" else bound
