"""Data-parallel training with torch DDP: gloo's all-reduce vs ringlab's hooks (ring, FP8, FP8 + error feedback).

Every variant trains the same MLP from the same initial weights on the same synthetic data (a
random teacher network labels Gaussian inputs; rank r draws its own batch each step), for the
same steps. Reported per variant: loss curve (global mean of the ranks' batch losses), final loss
(held-out set, 4096 samples), median step time (slowest rank), payload bytes each rank sends per
step (from the buckets the hook saw: ring 2(N-1)/N x bucket bytes; FP8: its messages), and
parameter agreement across ranks (bitwise, max |difference|).

    mpirun -n 4 python experiments/ddp_train.py --json docs/results/ddp/ddp_cpu.json --png docs/results/ddp/ddp_cpu.png

Variants: gloo (DDP's default all-reduce on a gloo group), ring (ring_allreduce_hook on ringlab's
progress thread), ring-inline (the same hook with overlap=False: in backward's thread), fp8
(fp8_allreduce_hook), fp8-ef (fp8_error_feedback_hook), ringlab-pg (DDP without a hook on the
"ringlab" torch.distributed backend).
"""
import argparse
import json
import os
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")   # the ranks fill the cores already

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from mpi4py import MPI  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab import ddp_hooks, torch_backend  # noqa: E402
from ringlab.bench.harness import run_metadata  # noqa: E402

VARIANTS = ("gloo", "ring", "ring-inline", "fp8", "fp8-ef", "ringlab-pg")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default="gloo,ring,fp8,fp8-ef", help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps; default %(default)s")
    p.add_argument("--inputs", type=int, default=64, help="input features; default %(default)s")
    p.add_argument("--hidden", type=int, default=512, help="hidden width; default %(default)s")
    p.add_argument("--layers", type=int, default=4, help="hidden layers; default %(default)s")
    p.add_argument("--classes", type=int, default=10, help="classes; default %(default)s")
    p.add_argument("--batch", type=int, default=32, help="samples per rank per step; default %(default)s")
    p.add_argument("--label-noise", type=float, default=0.3,
                   help="teacher logit noise (0: clean labels); default %(default)s")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate; default %(default)s")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model and gradient dtype")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="DDP bucket_cap_mb; default %(default)s")
    p.add_argument("--algo", default="ring", help="ring hook's algo; default %(default)s")
    p.add_argument("--fp8-algo", default="direct", choices=["ring", "direct"], help="FP8 hooks' algo")
    p.add_argument("--fmt", default="e4m3", choices=["e4m3", "e5m2"], help="FP8 format; default %(default)s")
    p.add_argument("--block", type=int, default=128, help="FP8 elements per scale; default %(default)s")
    p.add_argument("--no-overlap", dest="overlap", action="store_false",
                   help="hooks all-reduce in backward's thread (blocking) instead of on ringlab's progress thread")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: model and buckets on the GPU (hooks take the CuPy paths; gloo stays the baseline)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here (rank 0)")
    p.add_argument("--png", help="plot the loss curves here (rank 0)")
    return p.parse_args(argv)


def make_model(args, dtype):
    torch.manual_seed(args.seed)           # the same initial weights on every rank and for every variant
    dims = [args.inputs] + [args.hidden] * args.layers
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
        layers += [torch.nn.Linear(a, b), torch.nn.GELU()]
    layers.append(torch.nn.Linear(dims[-1], args.classes))
    return torch.nn.Sequential(*layers).to(dtype)


def teacher_data(args, n, seed, dtype):
    """n samples labelled by a fixed random teacher MLP (same teacher for every seed)."""
    t = torch.Generator().manual_seed(10_000 + args.seed)
    w1 = torch.randn(args.inputs, 128, generator=t) / args.inputs ** 0.5
    w2 = torch.randn(128, args.classes, generator=t) / 128 ** 0.5
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, args.inputs, generator=g)
    y = (torch.tanh(x @ w1) @ w2 + args.label_noise * torch.randn(n, args.classes, generator=g)).argmax(1)
    return x.to(dtype), y


def _recording(hook, sizes):
    def hook_recording_buckets(state, bucket):
        sizes[bucket.index()] = (bucket.buffer().numel(), bucket.buffer().element_size())
        return hook(state, bucket)
    return hook_recording_buckets


def wire_bytes(variant, sizes, nranks, args):
    block = args.block if variant.startswith("fp8") else None
    return sum(ddp_hooks.wire_bytes_per_rank(n, nranks, itemsize, fp8_block=block) for n, itemsize in sizes.values())


class TrainingRun:
    """One variant's DDP model, optimizer and records; ``step(i)`` trains on step i's batches."""

    def __init__(self, variant, args, comm, groups):
        self.variant, self.args, self.comm = variant, args, comm
        self.dtype = DTYPES[args.dtype]
        self.model = make_model(args, self.dtype).to(args.device)
        pg = groups["ringlab"] if variant == "ringlab-pg" else groups["gloo"]
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, process_group=pg, bucket_cap_mb=args.bucket_mb)
        self.sizes = {}
        hook, state = {"ring": (ddp_hooks.ring_allreduce_hook, ddp_hooks.RingHookState(
                           algo=args.algo, overlap=args.overlap)),
                       "ring-inline": (ddp_hooks.ring_allreduce_hook, ddp_hooks.RingHookState(
                           algo=args.algo, overlap=False)),
                       "fp8": (ddp_hooks.fp8_allreduce_hook, ddp_hooks.Fp8HookState(
                           algo=args.fp8_algo, fmt=args.fmt, block=args.block, overlap=args.overlap)),
                       "fp8-ef": (ddp_hooks.fp8_error_feedback_hook, ddp_hooks.Fp8ErrorFeedbackState(
                           algo=args.fp8_algo, fmt=args.fmt, block=args.block, overlap=args.overlap))
                       }.get(variant, (None, None))
        if hook is not None:
            self.ddp.register_comm_hook(state, _recording(hook, self.sizes))
        else:   # no hook: DDP's own buckets, counted as one exact ring all-reduce of all gradients
            self.sizes[0] = (sum(p.numel() for p in self.model.parameters()), torch.finfo(self.dtype).bits // 8)
        self.opt = torch.optim.Adam(self.ddp.parameters(), lr=args.lr)
        self.losses, self.times = [], []

    def step(self, i):
        x, y = teacher_data(self.args, self.args.batch, seed=1 + i * self.comm.size + self.comm.rank, dtype=self.dtype)
        x, y = x.to(self.args.device), y.to(self.args.device)
        self.comm.Barrier()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(self.ddp(x).float(), y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        if self.args.device == "cuda":
            torch.cuda.synchronize()      # the step's kernels, not only their launches
        self.times.append(time.perf_counter() - t0)
        self.losses.append(loss.item())

    def results(self):
        """The run's numbers, identical on every rank (collective: every rank calls it)."""
        comm, args = self.comm, self.args
        x, y = teacher_data(args, 4096, seed=2 ** 31 - 1, dtype=self.dtype)
        x, y = x.to(args.device), y.to(args.device)
        with torch.no_grad():
            final = torch.nn.functional.cross_entropy(self.model(x).float(), y).item()
        flat = torch.cat([p.detach().float().reshape(-1) for p in self.model.parameters()]).cpu().numpy()
        everyone = comm.allgather(flat)
        warm = min(5, len(self.times) - 1)
        step_time = max(comm.allgather(float(np.median(self.times[warm:]))))
        curve = np.mean(comm.allgather(np.array(self.losses)), axis=0)
        return {"variant": self.variant, "final_loss": max(comm.allgather(final)), "step_time_ms": 1e3 * step_time,
                "wire_bytes_per_step": wire_bytes(self.variant, self.sizes, comm.size, args),
                "params": int(flat.size), "buckets": len(self.sizes),
                "params_bitwise_equal": bool(all(np.array_equal(e, everyone[0]) for e in everyone)),
                "params_max_abs_diff": float(max(np.abs(e - everyone[0]).max() for e in everyone)),
                "loss_curve": [float(v) for v in curve]}


def train(variants, args, comm, groups):
    """Train every variant, interleaved step by step so load on the machine hits them all alike."""
    runs = [TrainingRun(v, args, comm, groups) for v in variants]
    for i in range(args.steps):
        for run in runs[i % len(runs):] + runs[:i % len(runs)]:   # rotate who goes first
            run.step(i)
    return [run.results() for run in runs]


def plot(results, path, meta):
    """Loss curves (top) and each curve minus the first variant's (bottom: FP8's drift is invisible above)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, dx) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    ref = np.array(results[0]["loss_curve"])
    for r in results:
        curve = np.array(r["loss_curve"])
        ax.plot(curve, label=f"{r['variant']} (final {r['final_loss']:.4f}, {r['step_time_ms']:.1f} ms/step)",
                linewidth=1.0)
        dx.plot(curve - ref, linewidth=1.0)
    ax.set_ylabel("training loss (mean over ranks)")
    ax.set_yscale("log")
    where = meta.get("device", "cpu").upper()
    ax.set_title(f"DDP, {meta['nranks']} ranks on {where}, {meta['params']:,} parameters, {meta['dtype']}")
    ax.legend(fontsize=8)
    dx.set_yscale("symlog", linthresh=1e-4)
    dx.set_xlabel("step")
    dx.set_ylabel(f"loss - {results[0]['variant']} loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    if args.device == "cuda":   # rank r -> GPU (local rank) % count: ranks may share a GPU
        from ringlab.arrays import use_local_gpu
        torch.cuda.set_device(use_local_gpu(comm))
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; expected {', '.join(VARIANTS)}")
    torch_backend.init_process_group("gloo", comm)
    groups = {"gloo": dist.group.WORLD,
              "ringlab": dist.new_group(backend="ringlab") if "ringlab-pg" in variants else None}
    results = train(variants, args, comm, groups)
    exact = next((r["final_loss"] for r in results if r["variant"] in ("gloo", "ring", "ring-inline")), None)
    for r in results:
        r["final_loss_vs_exact"] = None if exact is None else r["final_loss"] / exact - 1
    if comm.rank == 0:
        print(f"{'variant':>11} {'final loss':>11} {'vs exact':>9} {'ms/step':>8} {'bytes/step':>11} "
              f"{'ranks agree':>12}")
        for r in results:
            gap = "" if r["final_loss_vs_exact"] is None else f"{100 * r['final_loss_vs_exact']:+.2f}%"
            agree = "bitwise" if r["params_bitwise_equal"] else f"{r['params_max_abs_diff']:.1e}"
            print(f"{r['variant']:>11} {r['final_loss']:11.5f} {gap:>9} {r['step_time_ms']:8.2f} "
                  f"{r['wire_bytes_per_step']:11,d} {agree:>12}")
        meta = run_metadata(comm, torch=torch.__version__, dtype=args.dtype, device=args.device,
                            params=results[0]["params"],
                            args=vars(args))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "rows": results}, f, indent=1)
        if args.png:
            plot(results, args.png, meta)
    dist.destroy_process_group()
    return results


if __name__ == "__main__":
    main()
