"""The FP8 device ring and fp8-direct kernels in numba's CUDA simulator, bit for bit against the host FP8 paths.

N ranks are threads of one block; the oracle is collectives/fp8.py run in-process (threads, HostFp8Codec).
"""
import os
import queue
import threading

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ringlab.kernels import patch_numpy_for_numba  # noqa: E402

patch_numpy_for_numba()
from ringlab.kernels.device import SIMULATED, cuda  # noqa: E402

pytestmark = pytest.mark.skipif(not SIMULATED, reason="simulator tests (NUMBA_ENABLE_CUDASIM=1)")

import ml_dtypes  # noqa: E402

from ringlab.fp8 import fp8_direct_allreduce, fp8_ring_allreduce  # noqa: E402
from ringlab.gpu.device_plan import (address_row, chunk_blocks, direct_row, first_chunk, fp8_send_layout,  # noqa: E402
                                     program_table)
from ringlab.kernels import flags  # noqa: E402
from ringlab.kernels.codec import HostFp8Codec  # noqa: E402
from ringlab.kernels.fp8_direct_kernel import direct_kernel  # noqa: E402
from ringlab.kernels.ring_kernel import STATUS_TIMEOUT, fp8_codec, ring_kernel  # noqa: E402


class _Comm:
    def __init__(self, rank, size):
        self.rank, self.size = rank, size


class ThreadTransport:
    """sendrecv between threads of one process: the host FP8 executors run unchanged, N ranks at once."""

    def __init__(self, rank, size, boxes):
        self.comm, self.boxes = _Comm(rank, size), boxes

    def sendrecv(self, send, dest, recv, source, what=""):
        self.boxes[(self.comm.rank, dest)].put(np.array(send, copy=True))
        recv[...] = self.boxes[(source, self.comm.rank)].get(timeout=30)


def host_fp8(srcs, op, fmt, block, algo):
    """Every rank's result of the host FP8 executor (fp8_ring_allreduce / fp8_direct_allreduce) on ``srcs``."""
    n = len(srcs)
    boxes = {(a, b): queue.Queue() for a in range(n) for b in range(n)}
    outs = [np.zeros_like(s) for s in srcs]
    fn = fp8_ring_allreduce if algo == "fp8-ring" else fp8_direct_allreduce
    errors = []

    def run(r):
        try:
            fn(srcs[r].copy(), outs[r], ThreadTransport(r, n, boxes), HostFp8Codec(fmt, block), op)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    return outs


def _reg(a):
    """Register ``a`` (bf16 as its uint16 bits, what the kernel reads) and return its address."""
    return flags.register(a.view(np.uint16) if a.dtype == ml_dtypes.bfloat16 else a)


class SimFp8Ranks:
    """N ranks' send buffers, counters and status words in simulated device memory; calls share counters."""

    def __init__(self, n, fmt, block, capacity, parts=1, codec=None):
        self.n, self.parts, self.fmt, self.block = n, parts, fmt, block
        self.codec = fp8_codec(fmt, block) if codec is None else codec
        cb, sb = fp8_send_layout(capacity, n, block)
        self.codes = [np.zeros(cb, np.uint8) for _ in range(n)]
        self.scales = [np.zeros(sb // 4, np.float32) for _ in range(n)]
        self.flags = [np.zeros(128, np.uint64) for _ in range(n)]
        self.status = [np.zeros(4, np.uint64) for _ in range(n)]
        self.trace = [np.zeros(64, np.uint64) for _ in range(n)]
        self.calls = [np.zeros(64, np.uint64) for _ in range(n)]
        for a in self.codes + self.scales + self.flags + self.status + self.trace + self.calls:
            flags.register(a)

    def ring(self, srcs, outs, op, slices=1, timeout_ns=0, skip_rank=None, group=0):
        n, count, R = self.n, srcs[0].size, _reg
        ranks = [r for r in range(n) if r != skip_rank]
        rows = [address_row(R(srcs[r]), R(outs[r]), 0, 0, R(self.flags[r]), R(self.flags[r - 1]),
                            R(self.flags[(r + 1) % n]), R(self.status[r]), R(self.trace[r]), R(self.calls[r]), r, n,
                            send_codes=R(self.codes[r]), send_scales=R(self.scales[r]), left_codes=R(self.codes[r - 1]),
                            left_scales=R(self.scales[r - 1]), blocks_per_chunk=chunk_blocks(count, n, self.block),
                            first=first_chunk(count, n, r)) for r in ranks]
        table, prog = np.array(rows, np.int64), program_table(n, count, ranks)
        kern = ring_kernel(srcs[0].dtype, op, self.codec, group=group)
        kern[(self.parts, 1), (1, len(ranks))](R(table), R(prog), 2 * n - 1, slices, timeout_ns)

    def direct(self, srcs, outs, op, timeout_ns=0, skip_rank=None):
        n, count, R = self.n, srcs[0].size, _reg
        ranks = [r for r in range(n) if r != skip_rank]
        peers = np.array([[R(self.codes[q]), R(self.scales[q]), R(self.flags[q])] for q in range(n)], np.int64)
        rows = [direct_row(R(srcs[r]), R(outs[r]), R(self.codes[r]), R(self.scales[r]), R(self.flags[r]),
                           R(self.status[r]), R(self.trace[r]), R(self.calls[r]), r,
                           chunk_blocks(count, n, self.block), R(peers)) for r in ranks]
        table = np.array(rows, np.int64)
        kern = direct_kernel(srcs[0].dtype, op, self.fmt, self.block, warp_steps=getattr(self.codec, "warp_steps", 0),
                             prefetch=getattr(self.codec, "prefetch", 0))
        kern[(self.parts, 1), (1, len(ranks))](R(table), n, count, 0, timeout_ns)


def _inputs(n, count, dtype, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal(count) * scale).astype(dtype) for _ in range(n)]


def _run(sim, algo, srcs, op, slices=1, group=0):
    outs = [np.full(srcs[0].size, np.nan, srcs[0].dtype) for _ in srcs]
    if sim.n == 1:
        outs[0][...] = srcs[0]                 # the executor copies: nothing travels
    elif algo == "fp8-ring":
        sim.ring(srcs, outs, op, slices=slices, group=group)
    else:
        sim.direct(srcs, outs, op)
    return outs


def _assert_bitwise(outs, want, what):
    bits = outs[0].view(np.uint8)
    for r, o in enumerate(outs):
        assert np.array_equal(o.view(np.uint8), bits), f"{what}: rank {r} differs from rank 0"
        assert np.array_equal(o.view(np.uint8), want[r].view(np.uint8)), f"{what}: rank {r} differs from the host"


@pytest.mark.parametrize("algo", ["fp8-ring", "fp8-direct"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_counts_formats_blocks_bit_exact(algo, n):
    for fmt, block in (("e4m3", 32), ("e5m2", 256)):
        sim = SimFp8Ranks(n, fmt, block, capacity=600, parts=2)
        for count in sorted({1, max(n - 1, 1), 37, 293 if n <= 3 else 97}):
            srcs = _inputs(n, count, np.float32, count + n, scale=3.0)
            want = host_fp8(srcs, "sum", fmt, block, algo)
            _assert_bitwise(_run(sim, algo, srcs, "sum", slices=2), want, (algo, n, fmt, block, count))


@pytest.mark.parametrize("codec", ["plain", "tiles", "warps", "prefetch"])
def test_grouped_walks_give_the_host_bits(codec):
    """The FP8 ring walked G slices at a time (G = 1, 2, K not a multiple of G; 0 = all) gives the host ring's
    bits with every codec path: NaN and inf, fp16 avg, in place, calls of different orders sharing counters."""
    from ringlab.kernels.fp8_ring_codec import FWD_TILES, TILES, tiled_fp8_codec
    for n, fmt, block, dtype, op in ((3, "e5m2", 64, np.float16, "avg"), (5, "e4m3", 32, np.float32, "sum")):
        made = {"plain": None, "tiles": tiled_fp8_codec(fmt, block, TILES, FWD_TILES),
                "warps": tiled_fp8_codec(fmt, block, warp_steps=2),
                "prefetch": tiled_fp8_codec(fmt, block, 2, 2, prefetch=2)}[codec]
        sim = SimFp8Ranks(n, fmt, block, capacity=1200, parts=2, codec=made)
        for count, slices, group in ((521, 3, 1), (n * 64 + 5, 4, 3), (301, 2, 0)):
            srcs = _inputs(n, count, dtype, count + n, scale=3.0)
            srcs[0][5], srcs[-1][40], srcs[n // 2][17] = np.nan, np.inf, -np.inf
            want = host_fp8(srcs, op, fmt, block, "fp8-ring")
            _assert_bitwise(_run(sim, "fp8-ring", srcs, op, slices=slices, group=group), want,
                            (codec, n, fmt, block, count, slices, group))
            sim.ring(srcs, srcs, op, slices=slices, group=group)          # in place
            _assert_bitwise(srcs, want, (codec, n, "in place", count, slices, group))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_fp8_direct_on_warp_tiles_gives_the_host_bits(steps):
    """fp8-direct's encode and decode phases on the warp tiles (the owner's fold unchanged)."""
    from ringlab.kernels.fp8_ring_codec import tiled_fp8_codec
    for n, fmt, block, dtype, op in ((3, "e4m3", 32, np.float32, "sum"), (4, "e5m2", 256, np.float16, "avg"),
                                     (5, "e4m3", 128, ml_dtypes.bfloat16, "sum")):
        sim = SimFp8Ranks(n, fmt, block, capacity=700, parts=2, codec=tiled_fp8_codec(fmt, block, warp_steps=steps))
        for count in (1, n - 1, 97, 677):
            srcs = _inputs(n, count, dtype, count + steps, scale=2.0)
            if count > 90:
                srcs[1][7], srcs[0][60] = np.nan, -np.inf
            want = host_fp8(srcs, op, fmt, block, "fp8-direct")
            _assert_bitwise(_run(sim, "fp8-direct", srcs, op), want, (steps, n, fmt, block, dtype, count))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_warp_tile_path_gives_the_host_bits(steps):
    """The FP8 ring over fp8_ring_warps.py's warp tiles (one thread per rank here; tests of 32 lanes below):
    N = 1..5, counts 1, N-1, primes and a multi-tile count, every block size, both formats, sum and avg,
    fp32 / fp16 / bf16, NaN and inf, slices and parts: the host ring's bits on every rank."""
    from ringlab.kernels.fp8_ring_codec import tiled_fp8_codec
    cases = [(n, fmt, block, np.float32, "sum") for n, (fmt, block) in
             zip(range(1, 6), [("e4m3", 32), ("e5m2", 64), ("e4m3", 128), ("e5m2", 256), ("e4m3", 64)])]
    cases += [(3, "e4m3", 32, ml_dtypes.bfloat16, "avg"), (2, "e5m2", 128, np.float16, "avg")]
    for n, fmt, block, dtype, op in cases:
        sim = SimFp8Ranks(n, fmt, block, capacity=1100, parts=2, codec=tiled_fp8_codec(fmt, block, warp_steps=steps))
        for count in sorted({1, max(n - 1, 1), 37, 293 if n > 2 else 1031}):
            srcs = _inputs(n, count, dtype, count + n + steps, scale=3.0)
            if count > 40:
                srcs[0][5], srcs[-1][40], srcs[n // 2][17] = np.nan, np.inf, -np.inf
            want = host_fp8(srcs, op, fmt, block, "fp8-ring")
            _assert_bitwise(_run(sim, "fp8-ring", srcs, op, slices=2), want, (steps, n, fmt, block, dtype, count))


def test_fp8_direct_with_l2_prefetch_gives_the_host_bits(ahead=2):
    """fp8-direct's encode and decode phases asking L2 ahead (simulator: every prefetch checked inside its buffer)."""
    from ringlab.kernels.fp8_ring_codec import tiled_fp8_codec
    flags.PREFETCHED.clear()
    for n, fmt, block, dtype, op in ((3, "e4m3", 32, np.float32, "sum"), (2, "e5m2", 64, np.float16, "avg")):
        sim = SimFp8Ranks(n, fmt, block, capacity=800, codec=tiled_fp8_codec(fmt, block, 1, 3, prefetch=ahead))
        for count in (n - 1, 701):
            srcs = _inputs(n, count, dtype, count + ahead, scale=2.0)
            srcs[0][0] = np.nan
            want = host_fp8(srcs, op, fmt, block, "fp8-direct")
            _assert_bitwise(_run(sim, "fp8-direct", srcs, op), want, (ahead, n, fmt, block, dtype, count))
    assert flags.PREFETCHED, "the encode / decode phases asked L2 ahead"


def test_prefetch_is_checked():
    from ringlab.kernels.fp8_ring_codec import tiled_fp8_codec
    from ringlab.kernels.fp8_ring_tiles import fp8_tile_ops
    for bad in (3, -1, 8):
        with pytest.raises(ValueError, match="prefetch"):
            tiled_fp8_codec("e4m3", 128, prefetch=bad)
        with pytest.raises(ValueError, match="prefetch"):
            fp8_tile_ops(np.float32, "sum", "e4m3", 128, prefetch=bad)
    for kw in ({"tiles": 0}, {"warp_steps": 2}):                    # the lane-group tiles only
        with pytest.raises(ValueError, match="lane-group tiles only"):
            tiled_fp8_codec("e4m3", 128, prefetch=1, **kw)
    for name, bad in (("prefetch", 1.5), ("prefetch", True), ("tiles", "1"), ("tiles", 3), ("fwd_tiles", 0),
                      ("fwd_tiles", 64), ("warp_steps", None), ("tiles", 1.0)):
        with pytest.raises(ValueError, match=f"{name} must be an integer"):   # not silently int()-ed
            tiled_fp8_codec("e4m3", 128, **{name: bad})


def test_warp_steps_are_checked():
    from ringlab.kernels.fp8_ring_codec import tiled_fp8_codec
    from ringlab.kernels.fp8_ring_warps import fp8_warp_ops
    for bad in (3, -1, 8):
        with pytest.raises(ValueError, match="warp_steps"):
            tiled_fp8_codec("e4m3", 128, warp_steps=bad)
        with pytest.raises(ValueError, match="warp steps"):
            fp8_warp_ops(np.float32, "sum", "e4m3", 128, steps=bad)


@pytest.mark.parametrize("algo", ["fp8-ring", "fp8-direct"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_avg_and_narrow_dtypes(algo, dtype):
    n, count = 3, 71
    sim = SimFp8Ranks(n, "e4m3", 32, capacity=count)
    for op in ("sum", "avg"):
        srcs = _inputs(n, count, dtype, 7)
        _assert_bitwise(_run(sim, algo, srcs, op), host_fp8(srcs, op, "e4m3", 32, algo), (algo, dtype, op))


@pytest.mark.parametrize("algo", ["fp8-ring", "fp8-direct"])
def test_block_256_and_32_both_formats_n4(algo):
    n, count = 4, 263
    for fmt in ("e4m3", "e5m2"):
        for block in (32, 256):
            sim = SimFp8Ranks(n, fmt, block, capacity=count, parts=3)
            srcs = _inputs(n, count, np.float32, block)
            _assert_bitwise(_run(sim, algo, srcs, "sum", slices=3), host_fp8(srcs, "sum", fmt, block, algo),
                            (algo, fmt, block))


@pytest.mark.parametrize("algo", ["fp8-ring", "fp8-direct"])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_and_inf_follow_the_policy(algo):
    """docs/fp8.md: NaN stays NaN; inf stays inf in E5M2 and becomes NaN in E4M3; finite neighbours keep their
    block's scale (inf is left out of amax). Bit-exact against the host path, all ranks identical."""
    n, count = 3, 40
    for fmt in ("e4m3", "e5m2"):
        sim = SimFp8Ranks(n, fmt, 32, capacity=count)
        srcs = _inputs(n, count, np.float32, 11)
        srcs[0][3], srcs[1][20], srcs[2][35] = np.nan, np.inf, -np.inf
        srcs[1][36], srcs[2][36] = np.inf, -np.inf   # both infinities: inf + -inf = NaN
        outs = _run(sim, algo, srcs, "sum")
        _assert_bitwise(outs, host_fp8(srcs, "sum", fmt, 32, algo), (algo, fmt))
        assert np.isnan(outs[0][3]) and np.isnan(outs[0][36])
        if fmt == "e5m2":
            assert outs[0][20] == np.inf and outs[0][35] == -np.inf
        else:
            assert np.isnan(outs[0][20]) and np.isnan(outs[0][35])
        assert np.isfinite(outs[0][21]) and abs(outs[0][21]) > 0


@pytest.mark.parametrize("algo", ["fp8-ring", "fp8-direct"])
def test_repeated_calls_and_in_place(algo):
    n, count = 4, 45
    sim = SimFp8Ranks(n, "e4m3", 32, capacity=64, parts=2)
    for call in range(3):
        srcs = _inputs(n, count - call, np.float32, call)
        want = host_fp8(srcs, "sum", "e4m3", 32, algo)
        if algo == "fp8-ring":
            sim.ring(srcs, srcs, "sum", slices=2)        # out is src
        else:
            sim.direct(srcs, srcs, "sum")
        _assert_bitwise(srcs, want, (algo, call))


def test_integer_dtype_is_a_type_error():
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        ring_kernel(np.int32, "sum", fp8_codec("e4m3", 128))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        direct_kernel(np.int64, "sum", "e4m3", 128)
    with pytest.raises(ValueError, match="sum or avg"):
        ring_kernel(np.float32, "max", fp8_codec("e4m3", 128))
    with pytest.raises(ValueError):
        fp8_codec("e3m4", 128)
    with pytest.raises(ValueError):
        fp8_codec("e4m3", 48)


def test_without_co_running_kernels_each_algo_settles_clearly():
    """No co-residency ("host" after the probe): fp8-ring takes its host-driven fallback silently, fp8-direct keeps
    its kernel time-sliced with a warning that says why and what to do, or fails clearly if the probe never ended."""
    from ringlab.gpu.device_fp8 import settle_mode
    assert settle_mode("fp8-ring", "host", False, "why") == ("host", None)
    assert settle_mode("fp8-direct", "per-rank", True, "co-run") == ("per-rank", None)
    mode, warning = settle_mode("fp8-direct", "host", True, "probe: 4.8 ms after the last start")
    assert mode == "time-sliced" and "4.8 ms" in warning and "start MPS" in warning and "fp8-ring" in warning
    with pytest.raises(RuntimeError, match="did not complete a probe call.*transport='staged' or 'mpi'"):
        settle_mode("fp8-direct", "host", False, "probe timed out")


@pytest.mark.parametrize("algo, shape", [("fp8-ring", "1024 x 64"), ("fp8-direct", "768 x 80")])
def test_executor_launch_defaults_per_algo_and_bad_shapes(algo, shape):
    """DeviceFp8Ring checks its launch arguments before any GPU work (CPU here): each algo's default shape
    (device_fp8.LAUNCH) shows in the error for two blocks per SM; non-integers and oversized shapes are refused."""
    from ringlab.gpu.device_fp8 import LAUNCH, DeviceFp8Ring
    assert LAUNCH[algo][:2] == tuple(int(v) for v in shape.split(" x ")) and LAUNCH[algo][2] == 1  # tiles 2: refused
    with pytest.raises(ValueError, match=f"got 2 x {shape}$"):
        DeviceFp8Ring(None, algo=algo, blocks_per_sm=2)
    from ringlab.gpu.device_fp8 import launch_defaults
    assert launch_defaults(algo, None, None, 1) == LAUNCH[algo][:2] + (1,)
    assert [launch_defaults(algo, t, None, 1)[1] for t in (256, 512, 768, 1024)] == [255, 128, 80, 64]
    assert launch_defaults(algo, 512, None, 2) == (512, 64, 2) and launch_defaults(algo, 512, 96, 1) == (512, 96, 1)
    for bad in ({"threads": True}, {"threads": 512.0}, {"max_registers": "80"}, {"blocks_per_sm": None}):
        with pytest.raises(ValueError, match="must be an integer"):
            DeviceFp8Ring(None, algo=algo, **bad)
    for bad in ({"threads": 1056}, {"threads": 100}, {"threads": 1024, "max_registers": 128}, {"blocks_per_sm": 0}):
        with pytest.raises(ValueError, match="multiple of 32"):
            DeviceFp8Ring(None, algo=algo, **bad)
    if algo == "fp8-direct":
        with pytest.raises(ValueError, match="fp8-direct has no slices"):
            DeviceFp8Ring(None, algo=algo, group=1)


@pytest.mark.parametrize("algo", ["fp8-ring", "fp8-direct"])
def test_stalled_peer_times_out_naming_it(algo):
    n, count = 3, 12
    sim = SimFp8Ranks(n, "e4m3", 32, capacity=count)
    srcs = _inputs(n, count, np.float32, 0)
    outs = [np.zeros(count, np.float32) for _ in range(n)]
    if algo == "fp8-ring":
        sim.ring(srcs, outs, "sum", timeout_ns=50_000_000, skip_rank=1)      # rank 1 never starts
        assert sim.status[2][0] == STATUS_TIMEOUT and sim.status[2][1] == 1  # rank 2 waited on its left, 1
        assert sim.status[0][0] == STATUS_TIMEOUT and sim.status[0][1] == 2
    else:
        sim.direct(srcs, outs, "sum", timeout_ns=50_000_000, skip_rank=1)
        for r in (0, 2):
            assert sim.status[r][0] == STATUS_TIMEOUT and sim.status[r][1] == 1, (r, sim.status[r])


_PTX_CHECK = r"""
import sys, types
from ringlab.kernels import patch_numpy_for_numba
patch_numpy_for_numba()
import numba.cuda.dispatcher as disp
import numba.cuda.cudadrv.nvrtc as nv
import numba.cuda.cuda_paths as cp
from numba import cuda
root = sys.argv[1]
dev = types.SimpleNamespace(compute_capability=(9, 0))          # no GPU here
disp.get_current_device = cuda.get_current_device = lambda: dev
nv.get_arch_option = lambda major, minor: f"compute_{major}{minor}"
cp.get_cuda_paths._cached_result = {"nvrtc": None, "nvvm": types.SimpleNamespace(by="test", info=root + "/lib/libnvvm.so"),
    "libdevice": types.SimpleNamespace(by="test", info=root + "/nvvm/libdevice/libdevice.10.bc"),
    "cudalib_dir": None, "static_cudalib_dir": None, "include_dir": None}
from ringlab.kernels import fp8_direct_kernel as dk
from ringlab.kernels.ring_kernel import _SIGNATURE, fp8_codec, ring_kernel_source
for ptx in (cuda.compile_ptx(ring_kernel_source("float32", "sum", fp8_codec("e4m3", 128), "gpu"), _SIGNATURE,
                             cc=(9, 0))[0],
            cuda.compile_ptx(dk.direct_kernel_source("float16", "avg", "e5m2", 32), dk._SIGNATURE, cc=(9, 0))[0]):
    assert ptx.count("ld.acquire.") >= 1 and ptx.count("st.release.") >= 1 and ".nc" not in ptx
    assert ".f64" not in ptx and ".local" not in ptx
    assert "shfl.sync.bfly" in ptx, "the block amax is reduced over the warp"
print("ptx ok")
"""


def test_fp8_kernels_compile_to_ptx_for_sm90():
    """The real (non-simulated) FP8 ring and direct kernels type and lower for sm_90 (libNVVM, no GPU; one of each,
    the compile is slow: kernels/*.py's helpers are inlined at numba's IR level)."""
    import glob
    import subprocess
    import sys
    roots = sorted(p[:-len("/lib/libnvvm.so")] for p in glob.glob("/usr/local/cuda*/lib/libnvvm.so")
                   if os.path.exists(p[:-len("/lib/libnvvm.so")] + "/nvvm/libdevice/libdevice.10.bc"))
    if not roots:
        pytest.skip("no libNVVM + libdevice under /usr/local/cuda*")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    res = subprocess.run([sys.executable, "-c", _PTX_CHECK, roots[-1]], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0 and "ptx ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("algo", ["fp8-ring", "fp8-direct"])
def test_executor_rows_and_one_buffer_layout(algo):
    """DeviceFp8Ring's own table rows (gpu/device_fp8.py) over its layout: one send buffer per rank (codes, then
    scales at codes_bytes), counters then call counts in one word array; simulated, bit for bit vs the host."""
    from types import SimpleNamespace

    from ringlab.gpu.device_fp8 import DeviceFp8Ring
    from ringlab.kernels.ring_kernel import MAX_PARTS
    n, count, block, cap = 4, 301, 32, 400
    codes_bytes, scale_bytes = fp8_send_layout(cap, n, block)
    bufs = [np.zeros(codes_bytes + scale_bytes, np.uint8) for _ in range(n)]
    words = [np.zeros(2 * MAX_PARTS, np.uint64) for _ in range(n)]
    status = [np.zeros(4, np.uint64) for _ in range(n)]
    for r in range(n):
        flags.register(bufs[r]), flags.register(bufs[r][codes_bytes:].view(np.float32))
        flags.register(words[r]), flags.register(words[r][MAX_PARTS:]), flags.register(status[r])
    addr = [flags.register(b) for b in bufs]
    waddr = [flags.register(w) for w in words]
    peers = np.array([[addr[q], addr[q] + codes_bytes, waddr[q]] for q in range(n)], np.int64)
    rows = []
    srcs = _inputs(n, count, np.float32, 3)
    outs = [np.zeros(count, np.float32) for _ in range(n)]
    for r in range(n):
        ex = object.__new__(DeviceFp8Ring)
        ex.n, ex.rank, ex.codec, ex.algo, ex.codes_bytes = n, r, fp8_codec("e5m2", block), algo, codes_bytes
        ex.flags, ex.left_flags, ex.right_flags = waddr[r], waddr[r - 1], waddr[(r + 1) % n]
        ex.status_dev, ex.trace_dev, ex.send, ex.left_send = flags.register(status[r]), 0, addr[r], addr[r - 1]
        ex.peer_table = SimpleNamespace(data=SimpleNamespace(ptr=flags.register(peers)))
        rows.append(ex._row(flags.register(srcs[r]), flags.register(outs[r]), count, False)[0])
    table = flags.register(np.array(rows, np.int64))
    for call in range(2):                            # the second call reuses the counters (calls[p] on device)
        if algo == "fp8-ring":
            prog = flags.register(program_table(n, count, range(n)))
            ring_kernel(np.float32, "sum", fp8_codec("e5m2", block))[(2, 1), (1, n)](table, prog, 2 * n - 1, 2, 0)
        else:
            direct_kernel(np.float32, "sum", "e5m2", block)[(2, 1), (1, n)](table, n, count, 0, 0)
        _assert_bitwise(outs, host_fp8(srcs, "sum", "e5m2", block, algo), (algo, call))
        assert all(int(s[0]) == 0 for s in status)


@pytest.mark.parametrize("algo", ["fp8-ring", "fp8-direct"])
def test_vector_and_element_paths_give_the_host_bits(algo):
    """Quad-aligned chunks take the vector path (fp8_ring_quads.py), buffers off a 16-byte boundary the element
    path; mixed counts use both within one call. All equal the host bits."""
    n = 3
    for count in (4 * n * 9, 4 * n * 9 + 5):
        base = _inputs(n, count + 1, np.float32, count)
        for shift in (0, 1):                        # 1: 4 bytes off any 16-byte boundary -> element path only
            srcs = [np.ascontiguousarray(b[:count]) if shift == 0 else b[1:] for b in base]
            outs = [np.full(count + 1, np.nan, np.float32)[shift:shift + count] for _ in range(n)]
            sim = SimFp8Ranks(n, "e4m3", 32, capacity=count, parts=2)
            if algo == "fp8-ring":
                sim.ring(srcs, outs, "avg", slices=2)
            else:
                sim.direct(srcs, outs, "avg")
            _assert_bitwise(outs, host_fp8(srcs, "avg", "e4m3", 32, algo), (algo, count, shift))


def _lane_kernel(path, dtype, op, fmt, block, mode, lanes):
    """One warp (32 simulated threads) codes every block of [lo, hi) with the GPU's lane mapping."""
    from ringlab.kernels.fp8_ring_codec import fp8_block_ops
    from ringlab.kernels.fp8_ring_quads import fp8_quad_ops
    vector = path == "vector"
    if path.startswith("warp"):          # fp8_ring_warps.py: warp tiles of 1, 2 or 4 quads per lane
        from ringlab.kernels.fp8_ring_warps import fp8_warp_ops
        run = fp8_warp_ops(dtype, op, fmt, block, steps=int(path[4:]), width=32).run
    elif path.startswith("tiled"):       # fp8_ring_tiles.py: two blocks per lane group (hop), four (forward)
        from ringlab.kernels.fp8_ring_tiles import fp8_tile_ops
        run = fp8_tile_ops(dtype, op, fmt, block, tiles=2, fwd_tiles=4, lanes=lanes,
                           prefetch=int(path[5:] or 0)).run       # tiled-pD: L2 prefetches D rounds ahead
    if path.startswith("tiled") or path.startswith("warp"):

        def tiled(addrs, lo, hi, nranks, final):
            src, out, lc, ls = np.uint64(addrs[0]), np.uint64(addrs[1]), np.uint64(addrs[2]), np.uint64(addrs[3])
            mc, ms = np.uint64(addrs[4]), np.uint64(addrs[5])
            run(mode, src, out, lc, ls, mc, ms, lo, hi, 0, (hi - lo + block - 1) // block, 0, cuda.threadIdx.x, 32,
                nranks, final)
        return cuda.jit(tiled)
    if vector:
        move4 = fp8_quad_ops(dtype, op, fmt, block, lanes=lanes).move4
    else:
        move, lanes = fp8_block_ops(dtype, op, fmt, block, group=32).move, 32
    per_warp = 32 // lanes

    def kernel(addrs, lo, hi, nranks, final):
        lane = cuda.threadIdx.x
        src, out, lc, ls = np.uint64(addrs[0]), np.uint64(addrs[1]), np.uint64(addrs[2]), np.uint64(addrs[3])
        mc, ms = np.uint64(addrs[4]), np.uint64(addrs[5])
        nb = (hi - lo + block - 1) // block
        gw = 0
        while gw < nb:
            g = gw + lane // lanes
            e0 = lo + g * block
            if vector:
                move4(mode, src, out, lc, ls, mc, ms, e0, min(e0 + block, hi), g, lane % lanes, nranks, final, g < nb)
            elif g < nb:
                move(mode, src, out, lc, ls, mc, ms, e0, min(e0 + block, hi), g, lane, nranks, final)
            gw += per_warp
    return cuda.jit(kernel)


@pytest.mark.parametrize("ahead", [1, 2, 4])
@pytest.mark.parametrize("block", [32, 128, 256])
def test_l2_prefetches_stay_in_the_step_and_cover_later_rounds(ahead, block):
    """fp8_ring_tiles.py's prefetch (GPU lane mapping, 32 simulated threads): every prefetched line lies in what the
    mode reads of [lo, hi) (input lines, the left's code lines and scales; never our buffers or out), and every
    line a block of round 1 or later reads was asked for; the bits stay the reference's (the lane-mapping test)."""
    from ringlab.kernels.fp8_ring_codec import DECODE, ENCODE, FORWARD, REDUCE_ENCODE
    from ringlab.kernels.reference import quantize_fp8_blockwise
    lanes, fmt, lo = max(8, block // 16), "e4m3", 8
    hi = lo + 9 * block + 5
    nb = -(-(hi - lo) // block)
    rng = np.random.default_rng(ahead)
    x = rng.standard_normal(hi + 3).astype(np.float32)
    lc, mc = np.zeros(hi + 3, np.uint8), np.zeros(hi + 3, np.uint8)
    codes, scales = quantize_fp8_blockwise(x[lo:hi], fmt, block)
    lc[lo:hi] = codes
    ls, ms = scales.astype(np.float32), np.zeros(nb, np.float32)
    out = np.zeros(hi + 3, np.float32)
    regs = [_reg(a) for a in (x, out, lc, ls, mc, ms)]
    addrs = np.array(regs, np.int64)
    per_warp = 32 // lanes
    for mode, nblk in ((ENCODE, 2), (REDUCE_ENCODE, 2), (FORWARD, 4), (DECODE, 4)):
        flags.PREFETCHED.clear()
        _lane_kernel(f"tiled{ahead}", np.float32, "sum", fmt, block, mode, lanes)[1, 32](addrs, lo, hi, 2, False)
        got = set(flags.PREFETCHED)
        reads_src, reads_codes = mode in (ENCODE, REDUCE_ENCODE), mode != ENCODE
        for base, off in got:
            assert (base == regs[0] and reads_src and lo * 4 <= off < hi * 4) or \
                   (base == regs[2] and reads_codes and lo <= off < hi) or \
                   (base == regs[3] and reads_codes and off % 4 == 0 and off // 4 < nb), (mode, base, off)
        for g in range(per_warp * nblk, nb):                 # blocks of round 1 and later
            e0 = lo + g * block
            want = set()
            if reads_src:
                want |= {(regs[0], 4 * e) for e in range(e0, min(e0 + block, hi), 32)}
            if reads_codes:
                want |= {(regs[2], e) for e in range(e0, min(e0 + block, hi), 128)} | {(regs[3], 4 * g)}
            assert want <= got, (mode, g, sorted(want - got))


@pytest.mark.parametrize("path", ["vector", "element", "tiled", "tiled1", "tiled2", "warp1", "warp2", "warp4"])
@pytest.mark.parametrize("block", [32, 64, 128, 256])
def test_gpu_lane_mapping_in_the_simulator(path, block):
    """The GPU's lanes per block (8 or 16 on the vector path, 32 on the element path) and their shuffles, run as 32
    simulated threads: encode, the owner's avg hop (out too), forward and decode against kernels/reference.py."""
    from ringlab.kernels.fp8_ring_codec import DECODE, ENCODE, FORWARD, REDUCE_ENCODE
    from ringlab.kernels.fp8_ring_quads import lanes_per_block
    from ringlab.kernels.reference import (dequant_add_requant_reference, dequantize_fp8_blockwise,
                                           quantize_fp8_blockwise)
    lanes = max(8, block // 16)          # lanes_per_block on the GPU (1 in the simulator)
    assert lanes_per_block(block) == 1
    fmt, lo = "e4m3", 8
    hi = lo + (3 if path in ("vector", "element") else 9) * block + 5  # a partial last block, a straddling quad
    rng = np.random.default_rng(block)
    x = (rng.standard_normal(hi + 3) * 5).astype(np.float32)
    x[lo + 7] = np.inf                                   # out of amax; becomes NaN in E4M3
    x[lo + block + 2 * 4: lo + block + 3 * 4] = np.nan   # a whole quad of NaN: out of amax, stays NaN
    peer_codes, peer_scales = quantize_fp8_blockwise(rng.standard_normal(hi - lo).astype(np.float32), fmt, block)
    nb = -(-(hi - lo) // block)
    bufs = {k: np.zeros(hi + 3, np.uint8) for k in ("lc", "mc")}
    bufs["lc"][lo:hi] = peer_codes
    scales = {"ls": np.zeros(nb, np.float32), "ms": np.zeros(nb, np.float32)}
    scales["ls"][:] = peer_scales
    out = np.full(hi + 3, -1.0, np.float32)
    addrs = np.array([_reg(x), _reg(out), _reg(bufs["lc"]), _reg(scales["ls"]), _reg(bufs["mc"]), _reg(scales["ms"])],
                     np.int64)

    def run(mode, final):
        _lane_kernel(path, np.float32, "avg", fmt, block, mode, lanes)[1, 32](addrs, lo, hi, 3, final)

    run(ENCODE, False)
    codes, sc = quantize_fp8_blockwise(x[lo:hi], fmt, block)
    assert np.array_equal(bufs["mc"][lo:hi], codes) and np.array_equal(scales["ms"], sc)
    run(REDUCE_ENCODE, True)
    want_out = np.zeros(hi - lo, np.float32)
    codes, sc = dequant_add_requant_reference(x[lo:hi], peer_codes, peer_scales, fmt, block, divide_by=3,
                                              out=want_out)
    assert np.array_equal(bufs["mc"][lo:hi], codes) and np.array_equal(scales["ms"], sc)
    got = out[lo:hi]
    assert np.array_equal(np.isnan(got), np.isnan(want_out)) and np.array_equal(got[~np.isnan(got)],
                                                                                 want_out[~np.isnan(want_out)])
    assert out[lo - 1] == -1 and out[hi] == -1                        # nothing outside the chunk
    bufs["mc"][:], scales["ms"][:], out[:] = 0, 0, -1
    run(FORWARD, False)
    assert np.array_equal(bufs["mc"][lo:hi], peer_codes) and np.array_equal(scales["ms"], peer_scales)
    want = dequantize_fp8_blockwise(peer_codes, peer_scales, fmt, block)
    assert np.array_equal(out[lo:hi], want) and out[hi] == -1
    out[:] = -1
    run(DECODE, False)
    assert np.array_equal(out[lo:hi], want) and bufs["mc"][hi] == 0
