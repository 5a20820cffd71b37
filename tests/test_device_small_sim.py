"""One-shot / two-shot persistent kernels in numba's CUDA simulator: N ranks as threads of one block."""
import os
import re
import sys

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ringlab.kernels import patch_numpy_for_numba  # noqa: E402

patch_numpy_for_numba()
from ringlab.kernels.device import SIMULATED  # noqa: E402

pytestmark = pytest.mark.skipif(not SIMULATED, reason="simulator tests (NUMBA_ENABLE_CUDASIM=1)")

from ringlab.gpu.device_small import choose_device_algorithm, crossovers_from_rows, default_crossovers  # noqa: E402
from ringlab.kernels import flags  # noqa: E402
from ringlab.kernels.small_kernel import (ALGOS, KERNEL_DTYPES, PHASE_INPUT, PHASE_REDUCED, PHASES,  # noqa: E402
                                          STATUS_TIMEOUT, launch_parts, small_kernel, table_row)
from ringlab.schedule import chunk_bounds  # noqa: E402

CAP = 64                                    # elements per scratch half in these tests


class SimRanks:
    """N ranks' scratch buffers, counters and status words in simulated device memory; calls share them."""

    def __init__(self, n, dtype, cap=CAP):
        self.n, self.dtype, self.cap = n, np.dtype(dtype), cap
        self.scratch = [np.zeros(2 * cap, dtype) for _ in range(n)]
        self.flags = [np.zeros(64, np.uint64) for _ in range(n)]
        self.calls = [np.zeros(64, np.uint64) for _ in range(n)]
        self.status = [np.zeros(4, np.uint64) for _ in range(n)]
        self.trace = [np.zeros(4, np.uint64) for _ in range(n)]
        for a in self.scratch + self.flags + self.calls + self.status + self.trace:
            flags.register(a)

    def allreduce(self, srcs, outs, op, algo, parts=1, timeout_ns=0, skip_rank=None, lanes=1):
        n = self.n
        ranks = [r for r in range(n) if r != skip_rank]
        scr = [flags.register(a) for a in self.scratch]
        fl = [flags.register(a) for a in self.flags]
        rows = [table_row(scr, fl, flags.register(self.status[r]), flags.register(self.calls[r]),
                          flags.register(self.trace[r]), r, n, self.cap * self.dtype.itemsize,
                          src=flags.register(srcs[r]), out=flags.register(outs[r])) for r in ranks]
        table = np.array(rows, np.int64)
        small_kernel(self.dtype, op, algo)[(parts, 1), (lanes, len(ranks))](0, 0, srcs[0].size,
                                                                             flags.register(table), timeout_ns)


def host_ring_reference(srcs, op):
    """The host ring's bits: chunk c folded from rank c around the ring, the local operand first."""
    n, dt = len(srcs), srcs[0].dtype
    out = np.empty_like(srcs[0])
    fn = {"sum": np.add, "avg": np.add, "prod": np.multiply, "max": np.maximum, "min": np.minimum}[op]
    with np.errstate(over="ignore", invalid="ignore"):
        for c, (lo, hi) in enumerate(chunk_bounds(srcs[0].size, n)):
            acc = srcs[c % n][lo:hi].copy()
            for k in range(1, n):
                acc = fn(srcs[(c + k) % n][lo:hi], acc).astype(dt)
            if op == "avg":
                np.divide(acc, n, out=acc, casting="unsafe")
            out[lo:hi] = acc
    return out


def float64_reference(srcs, op):
    a = np.stack([s.astype(np.float64) for s in srcs])
    return {"sum": a.sum(0), "avg": a.mean(0), "prod": a.prod(0), "max": a.max(0), "min": a.min(0)}[op]


TOL = {"float16": 2 ** -11, "float32": 2 ** -24, "float64": 2 ** -53}


def _inputs(n, count, dtype, seed, op="sum"):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "i":
        return [rng.integers(-3 if op == "prod" else -50, 4 if op == "prod" else 50, count).astype(dtype)
                for _ in range(n)]
    if op == "prod":
        return [rng.uniform(0.5, 1.5, count).astype(dtype) for _ in range(n)]
    return [rng.standard_normal(count).astype(dtype) for _ in range(n)]


def _check(srcs, outs, op):
    want = host_ring_reference(srcs, op)
    for r, o in enumerate(outs):
        assert np.array_equal(o, want, equal_nan=True), (r, o, want)
    dt = srcs[0].dtype
    if dt.kind == "f" and op not in ("max", "min"):
        ref = float64_reference(srcs, op)
        scale = np.abs(np.stack(srcs).astype(np.float64)).sum(0) if op in ("sum", "avg") else np.abs(ref)
        tol = (len(srcs) + 1) * TOL[dt.name] * 1.1
        assert (np.abs(outs[0].astype(np.float64) - ref) <= tol * scale + 1e-300).all()


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_counts_fp32_sum_and_avg(algo, n):
    sim = SimRanks(n, np.float32)
    for count in sorted({1, max(n - 1, 1), 7, 13, 3 * n + 1}):
        for op in ("sum", "avg"):
            srcs = _inputs(n, count, np.float32, count)
            outs = [np.full(count, np.nan, np.float32) for _ in range(n)]
            sim.allreduce(srcs, outs, op, algo, parts=2)
            _check(srcs, outs, op)


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
@pytest.mark.parametrize("op", ["sum", "avg", "max", "min", "prod"])
def test_every_dtype_and_op(algo, dtype, op):
    if op == "avg" and np.dtype(dtype).kind == "i":
        pytest.skip("avg needs a floating dtype (check_op_dtype rejects it before any executor)")
    n, count = 3, 11
    sim = SimRanks(n, dtype)
    srcs = _inputs(n, count, dtype, 3, op)
    outs = [np.zeros(count, dtype) for _ in range(n)]
    sim.allreduce(srcs, outs, op, algo)
    _check(srcs, outs, op)


@pytest.mark.parametrize("algo", ALGOS)
def test_repeated_calls_in_place_and_counters_grow(algo):
    n, count = 4, 17
    sim = SimRanks(n, np.float64)
    for call in range(5):                     # both scratch halves, twice, counters carried across calls
        srcs = _inputs(n, count, np.float64, call)
        want = host_ring_reference(srcs, "sum")
        sim.allreduce(srcs, srcs, "sum", algo, parts=2)      # out is src
        for r in range(n):
            assert np.array_equal(srcs[r], want), (call, r)
        last = PHASE_REDUCED if algo == "twoshot" else PHASE_INPUT
        for r in range(n):
            assert list(sim.calls[r][:2]) == [call + 1, call + 1]
            assert list(sim.flags[r][:2]) == [call * PHASES + last] * 2


@pytest.mark.parametrize("algo", ALGOS)
def test_count_zero_and_fewer_elements_than_ranks(algo):
    n = 5
    sim = SimRanks(n, np.float32)
    for count in (0, 1, 2, n - 1):
        srcs = _inputs(n, count, np.float32, count)
        outs = [np.zeros(count, np.float32) for _ in range(n)]
        sim.allreduce(srcs, outs, "sum", algo, parts=3)      # more parts than elements: empty parts
        _check(srcs, outs, "sum")


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("algo", ALGOS)
def test_nan_and_integer_wraparound_follow_the_host_ring(algo):
    n = 3
    sim = SimRanks(n, np.float32)
    srcs = [np.array([np.nan, 1, 2, np.inf], np.float32), np.array([1, np.nan, 2, -np.inf], np.float32),
            np.ones(4, np.float32)]
    for op in ("max", "min", "sum"):
        outs = [np.zeros(4, np.float32) for _ in range(n)]
        sim.allreduce(srcs, outs, op, algo)
        _check(srcs, outs, op) if op != "sum" else None
        assert np.isnan(outs[0][:2]).all() and np.array_equal(outs[0], outs[2], equal_nan=True)
    sim = SimRanks(n, np.int32)
    big = [np.full(4, 2 ** 31 - 1, np.int32) for _ in range(n)]
    outs = [np.zeros(4, np.int32) for _ in range(n)]
    sim.allreduce(big, outs, "sum", algo)
    assert np.array_equal(outs[1], host_ring_reference(big, "sum"))


@pytest.mark.parametrize("algo", ALGOS)
def test_float16_is_computed_in_fp32_rounded_once(algo):
    n, count = 4, 9
    sim = SimRanks(n, np.float16)
    srcs = [np.full(count, 1000 + r, np.float16) for r in range(n)]
    srcs[1][:] = np.float16(0.3)
    for op in ("sum", "avg", "prod"):
        outs = [np.zeros(count, np.float16) for _ in range(n)]
        sim.allreduce(srcs, outs, op, algo)
        _check(srcs, outs, op) if op != "prod" else None
        assert np.array_equal(outs[0], host_ring_reference(srcs, op))


@pytest.mark.parametrize("algo", ALGOS)
def test_stalled_peer_times_out_naming_it(algo):
    n = 3
    sim = SimRanks(n, np.float32)
    srcs = _inputs(n, 6, np.float32, 0)
    outs = [np.zeros(6, np.float32) for _ in range(n)]
    sim.allreduce(srcs, outs, "sum", algo, timeout_ns=30_000_000, skip_rank=1)     # rank 1 never starts
    for r in (0, 2):
        assert sim.status[r][0] == STATUS_TIMEOUT and sim.status[r][1] == 1, sim.status[r]
        assert sim.status[r][2] == PHASE_INPUT and sim.status[r][3] == 0
        assert sim.calls[r][0] == 0                     # the call did not count: the communicator is unusable


def test_twoshot_stalls_in_the_gather_name_the_late_owner():
    """A peer whose second counter never moves (it died after its input was published) is named in phase 2."""
    n = 3
    sim = SimRanks(n, np.float32)
    srcs = _inputs(n, 6, np.float32, 0)
    outs = [np.zeros(6, np.float32) for _ in range(n)]
    sim.flags[2][0] = PHASE_INPUT                       # rank 2 "published its input" and then stopped
    sim.allreduce(srcs, outs, "sum", "twoshot", timeout_ns=30_000_000, skip_rank=2)
    for r in (0, 1):
        assert sim.status[r][0] == STATUS_TIMEOUT and sim.status[r][1] == 2
        assert sim.status[r][2] == PHASE_REDUCED


def test_trace_records_the_phases_in_order():
    n = 3
    sim = SimRanks(n, np.float32)
    srcs = _inputs(n, 5, np.float32, 0)
    outs = [np.zeros(5, np.float32) for _ in range(n)]
    sim.allreduce(srcs, outs, "sum", "twoshot")
    t = sim.trace[0].astype(np.int64)
    assert (t > 0).all() and (np.diff(t) >= 0).all()


def test_unaligned_buffers_take_the_scalar_path():
    n, count = 3, 29
    sim = SimRanks(n, np.float32)
    srcs = [a[1:] for a in _inputs(n, count + 1, np.float32, 5)]
    outs = [np.zeros(count + 1, np.float32)[1:] for _ in range(n)]
    for algo in ALGOS:
        sim.allreduce(srcs, outs, "sum", algo, parts=2)
        _check(srcs, outs, "sum")


def test_launch_parts_one_block_for_small_messages():
    assert launch_parts("oneshot", 8, 1024, 4, 16) == 1
    assert launch_parts("twoshot", 8, 1024, 4, 16) == 1
    assert launch_parts("oneshot", 8, 64 << 10, 4, 16) == 8
    assert launch_parts("oneshot", 8, 1 << 20, 4, 16) == 16


def test_auto_choice_defaults_and_table():
    assert choose_device_algorithm(8, 8) == "oneshot"
    assert choose_device_algorithm(default_crossovers(8)["oneshot_max_bytes"] + 4, 8) == "twoshot"
    assert choose_device_algorithm(64 << 20, 8) == "ring"
    assert choose_device_algorithm(64 << 20, 1) == "ring"
    table = {"fits": {}, "device": {"8": {"oneshot_max_bytes": 1024, "twoshot_max_bytes": 4096}}}
    assert [choose_device_algorithm(s, 8, table) for s in (8, 1024, 1028, 4096, 8192)] == \
        ["oneshot", "oneshot", "twoshot", "twoshot", "ring"]
    assert choose_device_algorithm(2048, 7, table) == "twoshot"          # nearest measured N
    assert choose_device_algorithm(2048, 8, table, capacity=1024) == "ring"   # over the scratch capacity


def test_crossovers_from_measured_rows():
    rows = {"oneshot": {8: 10.0, 1024: 11.0, 65536: 40.0}, "twoshot": {8: 15.0, 1024: 16.0, 65536: 30.0},
            "ring": {8: 50.0, 1024: 50.0, 65536: 35.0}}
    assert crossovers_from_rows(rows) == {"oneshot_max_bytes": 1024, "twoshot_max_bytes": 65536}
    # two-shot still wins at the largest size measured: the crossover is unknown, ``beyond`` bounds it
    assert crossovers_from_rows(rows, beyond=1 << 20)["twoshot_max_bytes"] == 1 << 20
    ring_wins = {a: {**v, 1 << 20: t} for (a, v), t in zip(rows.items(), (90.0, 80.0, 70.0))}
    assert crossovers_from_rows(ring_wins, beyond=4 << 20) == {"oneshot_max_bytes": 1024,
                                                               "twoshot_max_bytes": 65536}


_PTX_CHECK = r"""
import os, sys, types
from ringlab.kernels import patch_numpy_for_numba
patch_numpy_for_numba()
import numba.cuda.dispatcher as disp
import numba.cuda.cudadrv.nvrtc as nv
import numba.cuda.cuda_paths as cp
from numba import cuda
root = sys.argv[1]
disp.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))   # no GPU here
nv.get_arch_option = lambda major, minor: f"compute_{major}{minor}"
cp.get_cuda_paths._cached_result = {"nvrtc": None, "nvvm": types.SimpleNamespace(by="test", info=root + "/lib/libnvvm.so"),
    "libdevice": types.SimpleNamespace(by="test", info=root + "/nvvm/libdevice/libdevice.10.bc"),
    "cudalib_dir": None, "static_cudalib_dir": None, "include_dir": None}
from ringlab.kernels.small_kernel import _SIGNATURE, small_kernel_source
for algo, dtype, op in (("oneshot", "float32", "sum"), ("twoshot", "float16", "avg"), ("twoshot", "int64", "max")):
    ptx, _ = cuda.compile_ptx(small_kernel_source(dtype, op, algo), _SIGNATURE, cc=(9, 0))
    assert ptx.count("ld.acquire.sys") >= 2 and ptx.count("st.release.sys") >= 2 and ".nc" not in ptx, algo
    assert ".f64" not in ptx, f"{algo} {dtype}: float64 arithmetic crept in (an int64/uint64 mix?)"
ptx, _ = cuda.compile_ptx(small_kernel_source("float32", "sum", "twoshot", "gpu"), _SIGNATURE, cc=(9, 0))
# gpu scope (every rank on this GPU): the peers' counters at .gpu; only the timeout's status words stay .sys
assert ptx.count("ld.acquire.gpu") >= 1 and ptx.count("st.release.gpu") >= 2, "gpu-scope counters"
# two waits, each: one status read and the four status words of a timeout (nothing else at .sys)
assert ptx.count("ld.acquire.sys") == 2 and ptx.count("fence.acq_rel.sys") == ptx.count("st.release.sys") == 8, \
    "sys fences outside the timeout path"
print("ptx ok")
"""


def test_kernels_compile_to_ptx_for_sm90():
    """The real (non-simulated) kernels type and lower for sm_90 (libNVVM without a GPU; skipped without it)."""
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


def _host_ring_worker():
    """Under mpirun: the real host MPI ring gives host_ring_reference's bits for every op and dtype."""
    from mpi4py import MPI
    from ringlab.ring import ring_allreduce_inplace
    from ringlab.transport import MpiTransport
    comm = MPI.COMM_WORLD
    bad = []
    for dtype in KERNEL_DTYPES:
        for op in ("sum", "avg", "prod", "max", "min"):
            if op == "avg" and np.dtype(dtype).kind == "i":
                continue
            for count in (1, comm.size - 1 or 1, 7, 101):
                srcs = _inputs(comm.size, count, dtype, count, op)
                buf = srcs[comm.rank].copy()
                ring_allreduce_inplace(buf, MpiTransport(comm), op=op)
                if not np.array_equal(buf.view(np.uint8), host_ring_reference(srcs, op).view(np.uint8)):
                    bad.append((dtype, op, count))
    bad = comm.allreduce(len(bad))
    if comm.rank == 0:
        print("host ring reference OK" if bad == 0 else f"host ring reference: {bad} mismatches", flush=True)
    sys.exit(1 if bad else 0)


@pytest.mark.parametrize("n", [3, 4])
def test_the_reference_is_the_real_host_ring(run_mpi, n):
    res = run_mpi(n, "tests/test_device_small_sim.py", "--host-ring-worker", timeout=120)
    assert "host ring reference OK" in res.stdout


if __name__ == "__main__" and "--host-ring-worker" in sys.argv:
    _host_ring_worker()


class _FakeDeviceArray:
    """Just what the executor's argument checks read from a CuPy array (no GPU here)."""

    def __init__(self, size, dtype="float32", ptr=1 << 20, contiguous=True, ndim=1):
        self.size, self.dtype, self.ndim = size, np.dtype(dtype), ndim
        self.itemsize, self.nbytes = self.dtype.itemsize, size * self.dtype.itemsize
        self.data = type("Ptr", (), {"ptr": ptr})()
        self.flags = type("Flags", (), {"c_contiguous": contiguous})()


@pytest.mark.parametrize("algo", ALGOS)
def test_bad_input_gets_a_clear_error(algo):
    from ringlab.gpu.device_small import _check_buffers
    x = _FakeDeviceArray(16)
    _check_buffers(x, x, "sum", algo)                                       # in place is fine
    _check_buffers(x, _FakeDeviceArray(16, ptr=1 << 30), "avg", algo)        # disjoint is fine
    cases = [((_FakeDeviceArray(16, contiguous=False), x, "sum"), ValueError, "C-contiguous"),
             ((np.zeros(16, np.float32), x, "sum"), ValueError, "device (CuPy)"),
             ((_FakeDeviceArray(16, "int8"), _FakeDeviceArray(16, "int8"), "sum"), TypeError, "no kernel for int8"),
             ((x, _FakeDeviceArray(10, ptr=1 << 30), "sum"), ValueError, "out must match"),
             ((x, _FakeDeviceArray(16, ptr=(1 << 20) + 8), "sum"), ValueError, "overlap"),
             ((_FakeDeviceArray(4, "int32"), _FakeDeviceArray(4, "int32", ptr=1 << 30), "avg"), TypeError, "floating"),
             ((x, x, "mean"), ValueError, "unknown op")]
    for args, kind, words in cases:
        with pytest.raises(kind, match=re.escape(words)):
            _check_buffers(*args, algo)
