"""The ring kernel's staged calls and flag scopes in numba's CUDA simulator (N ranks as threads of one block).

A staged call copies the caller's src into the rank's staging buffer, runs the ring in place on the stages
(each rank reads its left's stage), and copies the result out: the bits must equal the unstaged ring's.
"""
import os

os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from ringlab.kernels import patch_numpy_for_numba  # noqa: E402

patch_numpy_for_numba()
from ringlab.kernels.device import SIMULATED  # noqa: E402

pytestmark = pytest.mark.skipif(not SIMULATED, reason="simulator tests (NUMBA_ENABLE_CUDASIM=1)")

from ringlab.gpu.device_plan import address_row, first_chunk, program_table  # noqa: E402
from ringlab.kernels import flags  # noqa: E402
from ringlab.kernels.ring_kernel import ring_kernel, ring_kernel_source  # noqa: E402
from ringlab.schedule import chunk_bounds  # noqa: E402


def host_ring_reference(srcs, op):
    """Chunk c folded from rank c around the ring, local operand first (the host ring's order)."""
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


class StagedRanks:
    """N ranks with counters and a staging buffer each (capacity elements), reused by every call."""

    def __init__(self, n, capacity, dtype, parts=1, scope="gpu", split=False):
        self.n, self.parts, self.scope, self.split = n, parts, scope, split
        self.flags = [np.zeros(128, np.uint64) for _ in range(n)]
        self.status = [np.zeros(4, np.uint64) for _ in range(n)]
        self.calls = [np.zeros(64, np.uint64) for _ in range(n)]
        self.stage = [np.full(capacity, -7, dtype) for _ in range(n)]
        self.stage_out = [np.full(capacity, -9, dtype) for _ in range(n)] if split else self.stage
        for a in self.flags + self.status + self.calls + self.stage + self.stage_out:
            flags.register(a)

    def allreduce(self, srcs, outs, op, slices=1):
        n, count = self.n, srcs[0].size
        for a in srcs + outs:
            flags.register(a)
        reg = flags.register
        rows = []
        for r in range(n):
            st, left = self.stage[r][:count], self.stage[r - 1][:count]
            so, left_out = self.stage_out[r][:count], self.stage_out[r - 1][:count]
            rows.append(address_row(reg(st), reg(so), reg(left), reg(left_out), reg(self.flags[r]),
                                    reg(self.flags[r - 1]), reg(self.flags[(r + 1) % n]), reg(self.status[r]), 0,
                                    reg(self.calls[r]), r, n,
                                    first=first_chunk(count, n, r), stage_in=reg(srcs[r]), stage_out=reg(outs[r]),
                                    stage_count=count))
        table, prog = np.array(rows, dtype=np.int64), program_table(n, count, range(n))
        kern = ring_kernel(srcs[0].dtype, op, scope=self.scope)
        kern[(self.parts, 1), (1, n)](reg(table), reg(prog), 2 * n - 1, slices, 0)


def _inputs(n, count, dtype, seed):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "i":
        return [rng.integers(-50, 50, count).astype(dtype) for _ in range(n)]
    return [rng.standard_normal(count).astype(dtype) for _ in range(n)]


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("n", [2, 3, 4, 5])
def test_staged_calls_match_the_host_ring(n, split):
    """Counts 1, N-1, primes, not divisible by N; parts and slices; every op; the stage is reused across calls;
    one staging buffer (the ring in place) or separate src/out halves (out of place)."""
    sim = StagedRanks(n, 64, np.float32, parts=2, split=split)
    for count in sorted({1, max(n - 1, 1), 7, 13, 37}):
        for op in ("sum", "avg", "max", "min", "prod"):
            srcs = _inputs(n, count, np.float32, count + n)
            keep = [s.copy() for s in srcs]
            outs = [np.full(count, np.nan, np.float32) for _ in range(n)]
            sim.allreduce(srcs, outs, op, slices=2)
            want = host_ring_reference(keep, op)
            for r in range(n):
                assert np.array_equal(outs[r], want), (n, count, op, r)
                assert np.array_equal(srcs[r], keep[r]), "a staged call must not write the caller's src"


@pytest.mark.parametrize("dtype", ["float16", "float64", "int32", "int64"])
def test_staged_dtypes_and_in_place(dtype):
    n, count = 3, 11
    sim = StagedRanks(n, 32, dtype, scope="sys")
    srcs = _inputs(n, count, dtype, 5)
    want = host_ring_reference([s.copy() for s in srcs], "sum")
    sim.allreduce(srcs, srcs, "sum")                    # out is src: the copy out lands in the caller's buffer
    for r in range(n):
        assert np.array_equal(srcs[r], want), (dtype, r)


def test_unaligned_caller_buffers():
    """Caller buffers off a 16-byte boundary take the scalar copy; the result is the same."""
    n, count = 3, 9
    sim = StagedRanks(n, 32, np.float32)
    base = [np.zeros(count + 1, np.float32) for _ in range(n)]
    srcs = [b[1:] for b in base]
    for r, s in enumerate(srcs):
        s[...] = np.arange(count, dtype=np.float32) * (r + 1)
    outs = [np.zeros(count + 1, np.float32)[1:] for _ in range(n)]
    sim.allreduce(srcs, outs, "sum")
    for r in range(n):
        assert np.array_equal(outs[r], np.arange(count, dtype=np.float32) * (n * (n + 1) // 2))


def test_scope_is_checked():
    with pytest.raises(ValueError, match="scope"):
        ring_kernel_source("float32", "sum", scope="cta")


_PTX_CHECK = r"""
import sys, types
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
from ringlab.kernels.ring_kernel import _SIGNATURE, ring_kernel_source
for scope, other in (("gpu", "sys"), ("sys", "gpu")):
    ptx, _ = cuda.compile_ptx(ring_kernel_source("float32", "sum", scope=scope), _SIGNATURE, cc=(9, 0))
    assert ptx.count(f"ld.acquire.{scope}") >= 2 and ptx.count(f"st.release.{scope}") >= 2, scope
    assert f"ld.acquire.{other}" not in ptx, f"{scope}: a counter load of the other scope"
    assert ptx.count("fence.acq_rel.sys") >= 1, "the timeout status (host memory) is published at sys scope"
    assert ".nc." not in ptx, "no non-coherent loads of memory a peer writes"
print("ptx ok")
"""


def test_identity_kernel_compiles_with_each_flag_scope():
    """The real kernel lowers for sm_90 with .gpu or .sys counters (libNVVM, no GPU; skipped without it)."""
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
