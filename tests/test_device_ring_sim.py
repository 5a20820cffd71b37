"""The persistent ring kernel in numba's CUDA simulator: N ranks as threads of one block, one process."""
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ringlab.kernels import patch_numpy_for_numba  # noqa: E402

patch_numpy_for_numba()
from ringlab.kernels.device import SIMULATED  # noqa: E402

pytestmark = pytest.mark.skipif(not SIMULATED, reason="simulator tests (NUMBA_ENABLE_CUDASIM=1)")

from ringlab.gpu.device_plan import address_row, launch_shape, program_table  # noqa: E402
from ringlab.kernels import flags  # noqa: E402
from ringlab.kernels.ring_kernel import KERNEL_DTYPES, STATUS_TIMEOUT, ring_kernel  # noqa: E402
from ringlab.schedule import chunk_bounds  # noqa: E402


class SimRanks:
    """N ranks' buffers, counters and status words in simulated device memory; calls share counters."""

    def __init__(self, n, parts=1):
        self.n, self.parts = n, parts
        self.flags = [np.zeros(64, np.uint64) for _ in range(n)]
        self.status = [np.zeros(4, np.uint64) for _ in range(n)]
        self.trace = [np.zeros(64, np.uint64) for _ in range(n)]
        self.calls = [np.zeros(64, np.uint64) for _ in range(n)]
        for a in self.flags + self.status + self.trace + self.calls:
            flags.register(a)

    def allreduce(self, srcs, outs, op, slices=1, timeout_ns=0, skip_rank=None, group=0):
        n = self.n
        for a in srcs + outs:
            flags.register(a)
        if n == 1:
            outs[0][...] = srcs[0]
            return
        ranks = [r for r in range(n) if r != skip_rank]
        table = np.array([address_row(*(flags.register(a) for a in (srcs[r], outs[r], srcs[r - 1], outs[r - 1],
                                                                      self.flags[r], self.flags[r - 1],
                                                                      self.flags[(r + 1) % n], self.status[r],
                                                                      self.trace[r], self.calls[r])), r, n)
                          for r in ranks], dtype=np.int64)
        prog = program_table(n, srcs[0].size, ranks)
        flags.register(table), flags.register(prog)
        kern = ring_kernel(srcs[0].dtype, op, group=group)
        kern[(self.parts, 1), (1, len(ranks))](flags.register(table), flags.register(prog), 2 * n - 1,
                                                slices, timeout_ns)


def host_ring_reference(srcs, op):
    """The host ring's result: chunk c folded from rank c around the ring, local operand first."""
    n, dt = len(srcs), srcs[0].dtype
    out = np.empty_like(srcs[0])
    fn = {"sum": np.add, "avg": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}[op]
    for c, (lo, hi) in enumerate(chunk_bounds(srcs[0].size, n)):
        acc = srcs[c % n][lo:hi].copy()
        for k in range(1, n):
            acc = fn(srcs[(c + k) % n][lo:hi], acc).astype(dt)
        if op == "avg":
            np.divide(acc, n, out=acc, casting="unsafe")
        out[lo:hi] = acc
    return out


def _inputs(n, count, dtype, seed):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "i":
        return [rng.integers(-50, 50, count).astype(dtype) for _ in range(n)]
    return [rng.standard_normal(count).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_counts_and_ops_fp32(n):
    sim = SimRanks(n, parts=2)
    for count in sorted({0, 1, max(n - 1, 0), 7, 13}):
        for op in ("sum", "avg", "max", "min", "prod"):
            srcs = _inputs(n, count, np.float32, count)
            outs = [np.full(count, np.nan, np.float32) for _ in range(n)]
            if count:
                sim.allreduce(srcs, outs, op, slices=2)
            else:
                continue                        # the executor launches nothing for an empty buffer
            want = host_ring_reference(srcs, op)
            for r in range(n):
                assert np.array_equal(outs[r], want), (n, count, op, r)


@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("op", ["sum", "avg", "max", "min", "prod"])
def test_every_dtype_and_op(dtype, op):
    if op == "avg" and np.dtype(dtype).kind == "i":
        pytest.skip("avg needs a floating dtype (check_op_dtype rejects it before any executor)")
    n, count = 3, 11
    sim = SimRanks(n)
    srcs = _inputs(n, count, dtype, 3)
    outs = [np.zeros(count, dtype) for _ in range(n)]
    sim.allreduce(srcs, outs, op)
    want = host_ring_reference(srcs, op)
    for r in range(n):
        assert np.array_equal(outs[r], want, equal_nan=True), (dtype, op, r)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_grouped_walks_give_the_same_bits(n):
    """Every order of the walk (G slices per group, G = 1 .. K and 0 = all; K not a multiple of G) gives the
    host ring's bits, out of place and in place, calls of different orders sharing the counters."""
    sim = SimRanks(n, parts=2)
    call = 0
    for count in (n * 5 + 3, 61):
        for slices, group in ((1, 1), (3, 1), (3, 2), (4, 3), (5, 2), (5, 0), (5, 5), (2, 7)):
            for in_place in (False, True):
                srcs = _inputs(n, count, np.float32, call)
                call += 1
                want = host_ring_reference(srcs, "sum")
                outs = srcs if in_place else [np.full(count, np.nan, np.float32) for _ in range(n)]
                sim.allreduce(srcs, outs, "sum", slices=slices, group=group)
                for r in range(n):
                    assert np.array_equal(outs[r], want), (n, count, slices, group, in_place, r)


def test_group_and_max_slices_are_checked():
    from ringlab.gpu.device_plan import check_max_slices
    from ringlab.kernels.ring_kernel import SLICE_STRIDE, check_group
    assert check_group(0) == 0 and check_group(SLICE_STRIDE) == SLICE_STRIDE
    for bad in (-1, SLICE_STRIDE + 1, 1.5, True, "2", None):
        with pytest.raises(ValueError, match="group"):
            ring_kernel(np.float32, "sum", group=bad)
        with pytest.raises(ValueError, match="max_slices"):
            check_max_slices(bad if bad != SLICE_STRIDE + 1 else 0)
    assert launch_shape(8, 16 << 20, 4, 16, 32 << 10, 32) == (16, 16)      # 64 MB: 512 KB per part / 32 KB
    assert launch_shape(8, 16 << 20, 4, 16, 16 << 10, 32) == (16, 32)
    assert launch_shape(8, 16 << 20, 4, 16, 16 << 10) == (16, 8)           # the default cap


def test_executors_check_launch_arguments_before_gpu_work():
    """The three device executors refuse bad launch arguments with a ValueError naming them before any GPU work
    (CPU here: comm=None is never reached); max_parts above the flag words' MAX_PARTS would write past them."""
    from ringlab.gpu.device_fp8 import DeviceFp8Ring
    from ringlab.gpu.device_plan import check_max_parts
    from ringlab.gpu.device_ring import DeviceRing
    from ringlab.gpu.device_small import DeviceSmallAllreduce
    from ringlab.kernels.ring_layout import MAX_PARTS
    assert check_max_parts(None) is None and check_max_parts(0) is None and check_max_parts(np.int64(0)) is None
    assert check_max_parts(MAX_PARTS) == MAX_PARTS and type(check_max_parts(np.int32(3))) is int
    assert launch_shape(8, 1 << 30, 4, 10 * MAX_PARTS)[0] == MAX_PARTS      # the plan clamps too
    from ringlab.gpu.device_plan import parts_for
    assert parts_for(None, 132, 1, 8) == 16 and parts_for(None, 132, 2, 1) == MAX_PARTS
    assert parts_for(None, 4, 1, 8) == 1
    assert parts_for(16, 132, 1, 8) == 16 and parts_for(3, 132, 1, 8) == 3
    with pytest.raises(ValueError, match="max_parts=17: 8 rank.s. share this GPU's 132 SMs.*at most 16 blocks"):
        parts_for(17, 132, 1, 8)                  # 136 blocks on 132 SMs: one would wait for a free SM forever
    for make in (DeviceRing, DeviceFp8Ring, DeviceSmallAllreduce):
        for bad in (MAX_PARTS + 1, -1, 2.0, True, "4"):
            with pytest.raises(ValueError, match="max_parts must be an integer in 1..64"):
                make(None, max_parts=bad)
    ring_cases = [({"threads": 100}, "multiple of 32"), ({"threads": 2048}, "multiple of 32"),
                  ({"threads": 512.0}, "threads must be an integer"), ({"blocks_per_sm": 0}, "blocks_per_sm"),
                  ({"max_registers": 8}, "max_registers"), ({"max_registers": "80"}, "max_registers"),
                  ({"slice_bytes": 0}, "slice_bytes"), ({"slice_bytes": 1.5e6}, "slice_bytes"),
                  ({"stage_bytes": -1}, "stage_bytes"), ({"max_in_flight": -2}, "max_in_flight"),
                  ({"group": -1}, "group"), ({"max_slices": 0}, "max_slices"), ({"mode": "fast"}, "mode")]
    for kw, words in ring_cases:
        with pytest.raises(ValueError, match=words):
            DeviceRing(None, **kw)
    for make, least in ((DeviceFp8Ring, 1), (DeviceSmallAllreduce, 64)):
        for bad in (least - 1, -5, 1e6, None):
            with pytest.raises(ValueError, match=f"capacity must be an integer >= {least}"):
                make(None, capacity=bad)


def test_in_place_and_repeated_calls_share_counters():
    n, count = 4, 9
    sim = SimRanks(n, parts=2)
    for call in range(3):
        srcs = _inputs(n, count, np.float64, call)
        want = host_ring_reference(srcs, "sum")
        sim.allreduce(srcs, srcs, "sum", slices=3)     # out is src: the reread waits guard the overwrite
        for r in range(n):
            assert np.array_equal(srcs[r], want), (call, r)


@pytest.mark.filterwarnings("ignore:overflow encountered")
def test_nan_and_integer_wraparound_follow_the_host_ring():
    n = 3
    sim = SimRanks(n)
    srcs = [np.array([np.nan, 1, 2], np.float32), np.array([1, np.nan, 2], np.float32), np.ones(3, np.float32)]
    outs = [np.zeros(3, np.float32) for _ in range(n)]
    sim.allreduce(srcs, outs, "max")
    assert np.isnan(outs[0][:2]).all() and outs[0][2] == 2
    big = [np.full(4, 2**31 - 1, np.int32) for _ in range(n)]
    outs = [np.zeros(4, np.int32) for _ in range(n)]
    sim.allreduce(big, outs, "sum")
    assert np.array_equal(outs[1], host_ring_reference(big, "sum"))


@pytest.mark.parametrize("slices,group", [(1, 0), (3, 1)])
def test_stalled_peer_times_out_naming_it(slices, group):
    n = 3
    sim = SimRanks(n)
    srcs = _inputs(n, 6, np.float32, 0)
    outs = [np.zeros(6, np.float32) for _ in range(n)]
    sim.allreduce(srcs, outs, "sum", slices=slices, timeout_ns=50_000_000, skip_rank=1, group=group)   # 1 never starts
    assert sim.status[2][0] == STATUS_TIMEOUT and sim.status[2][1] == 1     # rank 2 waited on its left, 1
    assert sim.status[0][0] == STATUS_TIMEOUT and sim.status[0][1] == 2     # rank 0 on 2, itself stuck on 1


def test_trace_records_every_primitive():
    n = 3
    sim = SimRanks(n)
    srcs = _inputs(n, 5, np.float32, 0)
    outs = [np.zeros(5, np.float32) for _ in range(n)]
    sim.allreduce(srcs, outs, "sum")
    t = sim.trace[0][: 2 * n]
    assert (t > 0).all() and (np.diff(t.astype(np.int64)) >= 0).all()


def test_launch_shape_small_is_one_block_one_slice():
    assert launch_shape(8, 16 << 10, 4, 16) == (1, 1)
    parts, slices = launch_shape(8, 64 << 20, 4, 16)
    assert parts == 16 and 1 < slices <= 8


def test_unaligned_buffers_take_the_scalar_path():
    n, count = 3, 29
    sim = SimRanks(n, parts=2)
    srcs = [a[1:] for a in _inputs(n, count + 1, np.float32, 5)]       # 4 bytes off any 16-byte boundary
    outs = [np.zeros(count + 1, np.float32)[1:] for _ in range(n)]
    sim.allreduce(srcs, outs, "sum", slices=2)
    want = host_ring_reference(srcs, "sum")
    for r in range(n):
        assert np.array_equal(outs[r], want)
