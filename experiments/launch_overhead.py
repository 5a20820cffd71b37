"""Host cost of one kernel call (GPU): what a ring step pays in Python before the GPU sees any work.

    python experiments/launch_overhead.py [--n 1M] [--calls 300] [--json out.json]

Each call is made ``--calls`` times back to back on small arrays (the GPU finishes each kernel sooner
than the host issues the next), then the stream is synchronized: host microseconds per call. Three
launch paths for the numba kernels, side by side: numba's dispatcher (typing every argument), the
cached overload through numba's ``_Kernel.launch`` (wraps each CuPy array as a numba device array), and
the lean parameter packer (kernels.device._LeanLauncher). A CuPy elementwise add is the yardstick.
Every kernel's result is checked against the NumPy reference once per path before it is timed.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ringlab.kernels  # noqa: E402,F401  (restores np.row_stack for numba-cuda on NumPy 2.5)
from ringlab.bench.harness import parse_size, require_gpu  # noqa: E402

PATHS = {"numba dispatcher": (False, False), "cached overload": (True, False), "lean packer": (True, True)}


def _set_path(fast, lean):
    from ringlab.kernels import device
    device._FAST, device._LEAN = fast, lean
    device._overloads.clear()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", default="1M", help="elements per array; default %(default)s")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--json")
    args = p.parse_args(argv)
    require_gpu("launch_overhead.py")
    import cupy

    from ringlab.kernels.fp8 import dequant_add_requant_device, quantize_device
    from ringlab.kernels.reduce import reduce_device
    from ringlab.kernels.reference import dequant_add_requant_reference, quantize_fp8_blockwise
    n = parse_size(args.n)
    rng = np.random.default_rng(0)
    hx, hy = rng.standard_normal(n, dtype=np.float32), rng.standard_normal(n, dtype=np.float32)
    x, y, z = cupy.asarray(hx), cupy.asarray(hy), cupy.empty(n, np.float32)
    qc, _ = quantize_fp8_blockwise(hx, "e4m3", 128)          # what quantize_device(x) must write
    wc, ws = quantize_fp8_blockwise(hy, "e4m3", 128)          # the peer message of the hop
    pc, ps = cupy.asarray(wc), cupy.asarray(ws)
    c, s = cupy.empty(n, np.uint8), cupy.empty(ws.size, np.float32)
    hc, hs = dequant_add_requant_reference(hx, wc, ws, "e4m3", 128)
    calls = {"cupy add (yardstick)": (lambda: cupy.add(x, y, out=z), lambda: np.array_equal(z.get(), hx + hy)),
             "reduce_device f32 sum": (lambda: reduce_device(x, y, "sum", out=z), lambda: np.array_equal(z.get(), hx + hy)),
             "quantize_device": (lambda: quantize_device(x, c, s), lambda: np.array_equal(c.get(), qc)),
             "dequant_add_requant_device": (lambda: dequant_add_requant_device(x, pc, ps, c, s),
                                            lambda: np.array_equal(c.get(), hc) and np.array_equal(s.get(), hs))}
    rows, failures = [], []
    stream = cupy.cuda.get_current_stream()
    for path, (fast, lean) in PATHS.items():
        _set_path(fast, lean)
        for name, (call, ok) in calls.items():
            if name.startswith("cupy") and path != "numba dispatcher":
                continue
            for _ in range(3):
                call()
            stream.synchronize()
            if not ok():
                failures.append(f"{name} ({path})")
            t0 = time.perf_counter()
            for _ in range(args.calls):
                call()
            stream.synchronize()
            us = (time.perf_counter() - t0) / args.calls * 1e6
            rows.append({"call": name, "path": "-" if name.startswith("cupy") else path, "us_per_call": us})
    _set_path(True, True)
    print(f"# host microseconds per call, {args.calls} calls of {n} elements, then one sync "
          f"({cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()})")
    print(f"{'call':>28s} {'launch path':>18s} {'us/call':>9s}")
    for r in rows:
        print(f"{r['call']:>28s} {r['path']:>18s} {r['us_per_call']:9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "calls": args.calls, "rows": rows, "failures": failures}, f, indent=1)
    print("ALL PASS" if not failures else "FAILED: " + "; ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
