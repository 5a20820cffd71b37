"""Communication cost of DP / TP / PP for a transformer, and the seeds' worked numbers rechecked.

    python experiments/cost_model.py --seeds                      # seed claim vs computed vs verdict
    python experiments/cost_model.py --model gpt3-175b --tp 8 --pp 2 --dp 4 --microbatches 8 \\
        --tp-link nvlink3 --pp-link ib-hdr --dp-link ib-hdr --mode both
    python experiments/cost_model.py --tp 8 --tp-link fit:docs/results/bandwidth/fit_cpu.json   # this lab's beta

Links: a name (nvlink3, nvlink3-per-direction, nvlink4, pcie4, ib-hdr, eth100), a bandwidth in GB/s
(e.g. 300 or 300@2us), or fit:PATH for the alpha and beta fitted by experiments/bandwidth_vs_n.py.
"""
import argparse
import os
import sys
from dataclasses import replace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.teach.costmodel import (LINKS, MODELS, Layout, Link, communication_cost, link_from_fit,  # noqa: E402
                                   ring_allreduce_seconds, seed_claims, tp_allreduce_bytes)

DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}


def parse_link(text):
    """'ib-hdr' | '300' (GB/s) | '300@2us' | 'fit:PATH' -> Link."""
    if text in LINKS:
        return LINKS[text]
    if text.startswith("fit:"):
        return link_from_fit(text[4:])
    bw, _, lat = text.partition("@")
    try:
        latency = float(lat.lower().removesuffix("us")) * 1e-6 if lat else 0.0
        return Link(f"{float(bw):g} GB/s" + (f", {lat}" if lat else ""), float(bw) * 1e9, latency)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad link {text!r}: use one of {sorted(LINKS)}, GB/s like 300 or "
                                         f"300@2us, or fit:PATH") from None


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt3-175b", choices=sorted(MODELS))
    for name in ("layers", "hidden", "heads", "seq", "batch"):
        p.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    p.add_argument("--params", type=float, help="override the parameter count (default: the preset's, else 12*L*H^2)")
    p.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="fp16")
    p.add_argument("--dp", type=int, default=1)
    p.add_argument("--tp", type=int, default=8)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--tp-link", type=parse_link, default=LINKS["nvlink3"])
    p.add_argument("--pp-link", type=parse_link, default=LINKS["ib-hdr"])
    p.add_argument("--dp-link", type=parse_link, default=LINKS["ib-hdr"])
    p.add_argument("--flops", type=float, default=312e12, help="sustained FLOP/s per GPU; default A100 fp16 peak")
    p.add_argument("--mode", choices=["training", "inference", "both"], default="both")
    p.add_argument("--seeds", action="store_true", help="print the seed-claim check table (and nothing else)")
    return p.parse_args(argv)


def human(value, unit):
    if unit == "s":
        for scale, name in ((1, "s"), (1e-3, "ms"), (1e-6, "us")):
            if abs(value) >= scale:
                return f"{value / scale:.3g} {name}"
        return f"{value * 1e9:.3g} ns"
    if unit == "B":
        for scale, name in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if abs(value) >= scale:
                return f"{value / scale:.4g} {name}"
        return f"{value:.0f} B"
    if unit == "B/s":
        return f"{value / 1e9:.4g} GB/s"
    return f"{value:.4g}{(' ' + unit) if unit else ''}"


def print_seed_table():
    claims = seed_claims()
    print(f"{'#':>3} {'seed':<14} {'claim':<62} {'seed says':>12} {'computed':>12}  verdict")
    for i, c in enumerate(claims, 1):
        print(f"{i:>3} {c.source:<14} {c.claim[:62]:<62} {human(c.seed, c.unit):>12} {human(c.computed, c.unit):>12}  {c.verdict}")
    print("\nnotes:")
    for i, c in enumerate(claims, 1):
        if c.note:
            print(f"{i:>3}. {c.note}")
    wrong = sum(not c.verdict.startswith(("ok", "order")) for c in claims)
    print(f"\n{len(claims)} claims checked: {len(claims) - wrong} ok, {wrong} wrong, inconsistent or an assumption to fix")


def print_tp_vs_n(model, link):
    """the tensor-parallel notes §4.2's table: one TP all-reduce vs N on the TP link."""
    nbytes = tp_allreduce_bytes(model)
    print(f"\none TP all-reduce of {human(nbytes, 'B')} on {link.name}: 2(N-1)/N*S/beta + 2(N-1)*alpha")
    for n in (2, 4, 8, 16):
        print(f"  N = {n:2d}: {human(ring_allreduce_seconds(nbytes, n, link), 's'):>10}   "
              f"(bytes sent per rank {human(2 * (n - 1) / n * nbytes, 'B')})")


def print_report(model, layout, args, mode):
    r = communication_cost(model, layout, args.tp_link, args.pp_link, args.dp_link, mode, args.flops)
    m = layout.microbatches
    print(f"\n== {mode} (one step, one DP replica's batch of {model.batch} in {m} micro-batch(es)) ==")
    print(f"per layer, one GPU: TP {r.tp_allreduces_per_layer} all-reduces x {m} micro-batch(es) x "
          f"{human(r.tp_bytes_per_allreduce, 'B')} = {human(r.tp_bytes_per_layer, 'B')} in "
          f"{human(r.tp_seconds_per_layer, 's')}; compute {human(r.compute_seconds_per_layer, 's')}; "
          f"compute/comm ratio (CCR) {r.ccr:.3g}")
    print(f"  {'':4}{'what':<28}{'volume':>14}{'time':>12}  note")
    rows = [("TP all-reduces", r.tp_bytes_per_step, r.tp_seconds_per_step,
             f"all layers' inputs; time = this GPU's {model.layers // layout.pp} layers on {args.tp_link.name}"),
            ("PP activations", r.pp_bytes_per_transfer * r.pp_transfers_per_step, r.pp_seconds_per_step,
             f"{r.pp_transfers_per_step} transfers of {human(r.pp_bytes_per_transfer, 'B')}; time = one boundary "
             f"on {args.pp_link.name}"),
            ("DP gradient all-reduce", r.dp_bytes_per_rank, r.dp_seconds_per_step,
             "per rank: params/(TP*PP)" + ("" if mode == "training" else "; none in inference (independent replicas)")),
            ("compute", float("nan"), r.compute_seconds_per_step, f"{args.flops / 1e12:g} TFLOP/s per GPU, no bubble")]
    for what, vol, sec, note in rows:
        vol_text = "-" if vol != vol else human(vol, "B")
        print(f"  {'':4}{what:<28}{vol_text:>14}{human(sec, 's'):>12}  {note}")
    print(f"  pipeline: speedup N/(1+(N-1)/M) = {r.pipeline_speedup:.3g}x of the ideal {layout.pp}x "
          f"(bubble {r.bubble_fraction * 100:.1f}% of the time)")


def main(argv=None):
    args = parse_args(argv)
    if args.seeds:
        print_seed_table()
        return 0
    overrides = {k: getattr(args, k) for k in ("layers", "hidden", "heads", "seq", "batch", "params")
                 if getattr(args, k) is not None}
    model = replace(MODELS[args.model], dtype_bytes=DTYPE_BYTES[args.dtype], **overrides)
    layout = Layout(args.dp, args.tp, args.pp, args.microbatches)
    try:
        layout.check(model)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"model {model.name}: L={model.layers} H={model.hidden} heads={model.heads} S={model.seq} "
          f"B={model.batch} {args.dtype}, {model.param_count / 1e9:.4g}B params")
    print(f"layout DP={layout.dp} TP={layout.tp} PP={layout.pp} M={layout.microbatches} "
          f"({layout.dp * layout.tp * layout.pp} GPUs); links: TP {args.tp_link.name}, PP {args.pp_link.name}, "
          f"DP {args.dp_link.name}")
    for mode in (("inference", "training") if args.mode == "both" else (args.mode,)):
        print_report(model, layout, args, mode)
    print_tp_vs_n(model, args.tp_link)
    return 0


if __name__ == "__main__":
    sys.exit(main())
