"""Communication cost of DP, TP and PP for a transformer (the DP, TP and 3D-parallelism notes), from the ring's α-β model."""
# Conventions (stated because the seeds mix them):
# - B is the batch of one data-parallel replica per step, split into M micro-batches; S sequence, H hidden.
# - A TP all-reduce carries one activation, B·S·H·dtype bytes (the tensor-parallel notes §1.2); 2 per layer forward
#   (attention output, FFN output) and 2 more backward (the tensor-parallel notes §1.1).
# - Ring all-reduce of S bytes on N ranks: 2(N-1)/N·S/β + 2(N-1)·α, with β the *per-direction* link
#   bandwidth (each rank sends and receives 2(N-1)/N·S at the same time).
# - Forward FLOPs of one layer: 24·B·S·H² + 4·B·S²·H (QKV 6, attention output 2, FFN 16 in units of
#   B·S·H², two multiply-adds of B·S²·H for scores and context; Narayanan et al., SC'21); training = 3×.
# - PP sends one micro-batch activation B/M·S·H·dtype across each of the PP-1 stage boundaries,
#   forward (and its gradient backward when training). DP all-reduces params/(TP·PP) gradients per rank.

import math
from dataclasses import dataclass

__all__ = ["ModelSpec", "Layout", "Link", "LINKS", "MODELS", "link_from_fit", "ring_allreduce_seconds",
           "layer_forward_flops", "tp_allreduce_bytes", "pipeline_speedup", "bubble_fraction", "CostReport",
           "communication_cost", "SeedClaim", "seed_claims"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    layers: int
    hidden: int
    heads: int
    seq: int
    batch: int
    dtype_bytes: int = 2
    params: float = None        # None: 12·L·H² (attention 4H² + FFN 8H² per layer, embeddings left out)

    @property
    def param_count(self):
        return self.params if self.params is not None else 12 * self.layers * self.hidden ** 2


@dataclass(frozen=True)
class Layout:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    microbatches: int = 1

    def check(self, model):
        """Raise ValueError for a layout the model cannot be cut into."""
        for name in ("dp", "tp", "pp", "microbatches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if model.heads % self.tp:
            raise ValueError(f"TP = {self.tp} must divide the {model.heads} attention heads")
        if model.layers % self.pp:
            raise ValueError(f"PP = {self.pp} must divide the {model.layers} layers")
        if model.batch % self.microbatches:
            raise ValueError(f"{self.microbatches} micro-batches must divide the batch of {model.batch}")


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth_Bps: float        # per direction, as the ring uses it
    latency_s: float = 0.0


# Bandwidths as the tensor-parallel notes §3 quotes them. NVLink's "600 GB/s" is A100's total of both directions
# (12 links × 25 GB/s each way); the ring sees 300 GB/s per direction: see nvlink3-per-direction.
LINKS = {
    "nvlink3": Link("NVLink 3.0 as the seed quotes it (600 GB/s)", 600e9, 2e-6),
    "nvlink3-per-direction": Link("NVLink 3.0, per direction (300 GB/s)", 300e9, 2e-6),
    "nvlink4": Link("NVLink 4.0 as the seed quotes it (900 GB/s)", 900e9, 2e-6),
    "pcie4": Link("PCIe 4.0 x16 (32 GB/s)", 32e9, 10e-6),
    "ib-hdr": Link("InfiniBand HDR 200 Gb/s (25 GB/s)", 25e9, 1.5e-6),
    "eth100": Link("Ethernet 100 Gb/s (12.5 GB/s)", 12.5e9, 30e-6),
}

MODELS = {
    # the tensor-parallel notes §1.2 / the data-parallel cost notes §2: GPT-3 175B, B = 32, S = 2048, fp16
    "gpt3-175b": ModelSpec("GPT-3 175B", layers=96, hidden=12288, heads=96, seq=2048, batch=32, params=175e9),
    "gpt-j-6b": ModelSpec("GPT-J 6B", layers=28, hidden=4096, heads=16, seq=2048, batch=8, params=6e9),
    "llama2-70b": ModelSpec("Llama-2 70B (dense-attention approximation)", layers=80, hidden=8192, heads=64,
                            seq=4096, batch=8, params=70e9),
}


def link_from_fit(path, algo="ring"):
    """A Link with the α and β this lab measured (an alphabeta fit JSON)."""
    from ringlab.teach.alphabeta import load_fit
    fit = load_fit(path, algo)
    return Link(f"measured {algo} on {fit.machine.get('host', '?')} ({fit.beta_Bps / 1e9:.3g} GB/s)",
                fit.beta_Bps, fit.alpha_s)


def ring_allreduce_seconds(nbytes, nranks, link):
    """Ring all-reduce time: 2(N-1)/N·S/β + 2(N-1)·α; zero on one rank."""
    if nranks <= 1:
        return 0.0
    return 2 * (nranks - 1) / nranks * nbytes / link.bandwidth_Bps + 2 * (nranks - 1) * link.latency_s


def layer_forward_flops(model, batch=None):
    """24·B·S·H² + 4·B·S²·H: one transformer layer's forward pass."""
    b = model.batch if batch is None else batch
    return 24 * b * model.seq * model.hidden ** 2 + 4 * b * model.seq ** 2 * model.hidden


def tp_allreduce_bytes(model, batch=None):
    """One TP all-reduce: an activation of B·S·H elements."""
    b = model.batch if batch is None else batch
    return b * model.seq * model.hidden * model.dtype_bytes


def pipeline_speedup(stages, microbatches):
    """N/(1 + (N-1)/M): M micro-batches take M + N - 1 stage-times instead of M·N on one device."""
    return stages / (1 + (stages - 1) / microbatches)


def bubble_fraction(stages, microbatches):
    """Idle share of a pipeline: (N-1)/(M+N-1)."""
    return (stages - 1) / (microbatches + stages - 1)


@dataclass
class CostReport:
    """Per-layer and per-step volumes (bytes) and times (seconds) of one layout; see ``communication_cost``."""
    mode: str
    tp_allreduces_per_layer: int
    tp_bytes_per_allreduce: float
    tp_seconds_per_allreduce: float
    tp_bytes_per_layer: float
    tp_seconds_per_layer: float
    compute_seconds_per_layer: float
    ccr: float                   # TP: compute time / communication time per layer (per GPU)
    tp_bytes_per_step: float     # summed over all layers and micro-batches (all stages)
    tp_seconds_per_step: float   # on one GPU's critical path: its stage's layers
    pp_bytes_per_transfer: float
    pp_transfers_per_step: int   # over all stage boundaries, both directions when training
    pp_seconds_per_step: float   # one boundary's link, M transfers each way
    dp_bytes_per_rank: float
    dp_seconds_per_step: float
    compute_seconds_per_step: float
    pipeline_speedup: float
    bubble_fraction: float


def communication_cost(model, layout, tp_link, pp_link=None, dp_link=None, mode="training", flops_per_gpu=312e12):
    """Volumes and times of DP, TP and PP communication for one step of ``model`` on ``layout``.

    ``mode`` is "training" (forward + backward, DP gradient all-reduce) or "inference" (forward only,
    no DP traffic: replicas serve different requests). ``flops_per_gpu`` is the sustained rate.
    """
    if mode not in ("training", "inference"):
        raise ValueError(f"mode must be 'training' or 'inference', got {mode!r}")
    if tp_link.bandwidth_Bps <= 0 or flops_per_gpu <= 0:
        raise ValueError("bandwidths and flops_per_gpu must be > 0")
    layout.check(model)
    pp_link, dp_link = pp_link or tp_link, dp_link or tp_link
    train = mode == "training"
    mb = model.batch // layout.microbatches
    m, stages = layout.microbatches, layout.pp
    layers_per_stage = model.layers // stages

    per_layer = 4 if train else 2
    ar_bytes = tp_allreduce_bytes(model, mb)
    ar_s = ring_allreduce_seconds(ar_bytes, layout.tp, tp_link)
    compute_layer = layer_forward_flops(model, mb) * (3 if train else 1) / layout.tp / flops_per_gpu
    comm_layer = per_layer * ar_s
    act_bytes = mb * model.seq * model.hidden * model.dtype_bytes
    directions = 2 if train else 1
    pp_each = act_bytes / pp_link.bandwidth_Bps + pp_link.latency_s if stages > 1 else 0.0
    dp_bytes = model.param_count / (layout.tp * layout.pp) * model.dtype_bytes
    return CostReport(
        mode=mode, tp_allreduces_per_layer=per_layer if layout.tp > 1 else 0,
        tp_bytes_per_allreduce=ar_bytes, tp_seconds_per_allreduce=ar_s,
        tp_bytes_per_layer=per_layer * ar_bytes * m if layout.tp > 1 else 0.0,
        tp_seconds_per_layer=comm_layer * m, compute_seconds_per_layer=compute_layer * m,
        ccr=compute_layer / comm_layer if comm_layer > 0 else math.inf,
        tp_bytes_per_step=model.layers * per_layer * ar_bytes * m if layout.tp > 1 else 0.0,
        tp_seconds_per_step=layers_per_stage * comm_layer * m,
        pp_bytes_per_transfer=act_bytes if stages > 1 else 0.0,
        pp_transfers_per_step=(stages - 1) * m * directions,
        pp_seconds_per_step=m * directions * pp_each,
        dp_bytes_per_rank=dp_bytes if train and layout.dp > 1 else 0.0,
        dp_seconds_per_step=ring_allreduce_seconds(dp_bytes, layout.dp, dp_link) if train else 0.0,
        compute_seconds_per_step=layers_per_stage * compute_layer * m,
        pipeline_speedup=pipeline_speedup(stages, m), bubble_fraction=bubble_fraction(stages, m))


# ---- the seeds' worked numbers, recomputed --------------------------------------------------------

@dataclass
class SeedClaim:
    source: str
    claim: str
    seed: float
    computed: float
    unit: str
    verdict: str
    note: str = ""


def _arith(seed, computed, tol=0.02):
    """'ok' within ``tol``, 'ok (rounded)' within 5%, else 'WRONG' with the factor."""
    err = abs(seed - computed) / abs(computed)
    if err <= tol:
        return "ok"
    if err <= 0.05:
        return "ok (rounded)"
    ratio = seed / computed
    return f"WRONG ({ratio:.3g}x)" if ratio >= 1 else f"WRONG (1/{1 / ratio:.3g}x)"


def seed_claims():
    """Every worked number of the DP, TP and 3D-parallelism notes, recomputed exactly, with a verdict."""
    g = MODELS["gpt3-175b"]
    nv, nv1, ib = LINKS["nvlink3"], LINKS["nvlink3-per-direction"], LINKS["ib-hdr"]
    seed_nv, seed_ib = Link("seed", 600e9), Link("seed", 25e9)      # the seed's numbers leave α out
    ar = tp_allreduce_bytes(g)                                         # 1,610,612,736 bytes
    t8 = ring_allreduce_seconds(1.6e9, 8, seed_nv)
    f_layer = layer_forward_flops(g)
    compute8 = f_layer / 8 / 312e12                                    # per layer forward, 8-way TP
    attn8 = (8 * g.batch * g.seq * g.hidden ** 2 + 4 * g.batch * g.seq ** 2 * g.hidden) / 8 / 312e12
    ffn8 = 16 * g.batch * g.seq * g.hidden ** 2 / 8 / 312e12
    comm8 = 2 * ring_allreduce_seconds(ar, 8, seed_nv)
    ccr_seed_expr = 312e12 / 600e9 * (8 * 12288 + 4 * 2048) / 4
    ccr_right = compute8 / comm8
    c = []
    add = lambda *a: c.append(SeedClaim(*a))  # noqa: E731
    add("001 §1.2", "one TP all-reduce = 32*2048*12288*2 B", 1.6e9, ar, "B", _arith(1.6e9, ar, 0.01),
        "1,610,612,736 B exactly (1.61 GB = 1.50 GiB)")
    add("001 §1.2", "TP per layer fwd+bwd = 4 all-reduces", 6.4e9, 4 * ar, "B", _arith(6.4e9, 4 * ar))
    for n, seed_ms in ((2, 2.67), (4, 4.00), (8, 4.67), (16, 5.00)):
        add("001 §2.2/§4.2", f"ring all-reduce 1.6 GB, N={n}, 600 GB/s", seed_ms * 1e-3,
            ring_allreduce_seconds(1.6e9, n, seed_nv), "s", _arith(seed_ms * 1e-3, ring_allreduce_seconds(1.6e9, n, seed_nv)),
            "with the exact 1.61 GB: %.2f ms" % (ring_allreduce_seconds(ar, n, seed_nv) * 1e3) if n == 8 else "")
    add("001 §2.2", "ring all-reduce 1.6 GB, N=8, IB 25 GB/s", 0.112, ring_allreduce_seconds(1.6e9, 8, seed_ib), "s",
        _arith(0.112, ring_allreduce_seconds(1.6e9, 8, seed_ib)),
        "with the exact 1.61 GB: %.1f ms" % (ring_allreduce_seconds(ar, 8, seed_ib) * 1e3))
    add("001 §2.2", "latency term (N-1)*latency, N=8, 2 us", 7 * 2e-6, 2 * 7 * 2e-6, "s", "WRONG (1/2x)",
        "the ring has 2(N-1) sequential steps (reduce-scatter + all-gather); N-1 is one phase. "
        "Negligible here: 28 us vs 4.67 ms")
    add("001 §3", "NVLink 3.0 bandwidth used as the ring's beta", 600e9, nv1.bandwidth_Bps, "B/s", "assumption",
        "600 GB/s is A100's total over both directions; the ring's beta is per direction (300 GB/s), "
        "so every NVLink time in the seeds is 2x optimistic: N=8, 1.61 GB -> %.2f ms"
        % (ring_allreduce_seconds(ar, 8, nv1) * 1e3))
    add("001 §4.1", "compute per layer (fwd, 8-way TP, 312 TFLOPS)", 0.100, compute8, "s", _arith(0.100, compute8, 0.03),
        "24BSH^2+4BS^2H at peak: attention %.1f ms (seed 35), FFN %.1f ms (seed 65)" % (attn8 * 1e3, ffn8 * 1e3))
    add("001 §4.1", "comm share 9.34/(100+9.34)", 0.085, comm8 / (compute8 + comm8), "", _arith(0.085, comm8 / (compute8 + comm8), 0.05),
        "exact: %.2f ms comm vs %.1f ms compute" % (comm8 * 1e3, compute8 * 1e3))
    single = f_layer / 312e12
    t16 = single / 16 + 0.050
    add("001 §5.1", "16 GPUs over IB: speedup 100/(100/16+50) = 1.78x", 1.78, single / t16, "x", "inconsistent",
        "the arithmetic is right, but 100 ms is the 8-GPU time (§4.1); one GPU needs %.0f ms, so with the seed's "
        "50 ms of IB comm the speedup is %.1fx (efficiency %.0f%%, not 11%%)" % (single * 1e3, single / t16, single / t16 / 16 * 100))
    add("001 §7.1", "CCR example ~= 27000", 27000, ccr_right, "", _arith(27000, ccr_right),
        "the seed's own expression evaluates to %.3g (it drops the 520 factor); the expression itself is "
        "inverted (CCR ~ BW/FLOPS, not FLOPS/BW), forgets the 2 bytes of fp16, that TP splits compute N ways "
        "and uses 8BSH^2 for 24BSH^2. Correct: %.1f, matching §4.1's own 100 ms / 9.34 ms = 10.7"
        % (ccr_seed_expr, ccr_right))
    add("000 §1", "TP inference all-reduces per forward (96 layers)", 192, 2 * g.layers, "", _arith(192, 2 * g.layers),
        "'192 x B x S x H x 2 bytes per sample' contains B: it is per batch (%.0f GB at B=32)" % (2 * g.layers * ar / 1e9))
    add("000 §2", "TP training volume 384*32*2048*12288*2", 620e9, 4 * g.layers * ar, "B", _arith(620e9, 4 * g.layers * ar),
        "618.5 GB: all-reduce input summed; each rank sends 2(N-1)/N of that (1.08 TB at N=8)")
    add("000 §2", "DP training volume 175B params * 2 B", 350e9, g.param_count * 2, "B", _arith(350e9, g.param_count * 2))
    for what, seed_s, nbytes, link in (("TP 620 GB / 600 GB/s ~= 1 s", 1.0, 4 * g.layers * ar, seed_nv),
                                       ("DP 350 GB / 600 GB/s ~= 0.58 s", 0.58, 350e9, seed_nv),
                                       ("DP 350 GB / 25 GB/s = 14 s", 14.0, 350e9, seed_ib)):
        ring = ring_allreduce_seconds(nbytes, 8, link)
        add("000 §3", what, seed_s, ring, "s", _arith(seed_s, ring),
            "S/B leaves out the ring's 2(N-1)/N (the tensor-parallel notes' own formula): x1.75 at N=8")
    add("000 §5", "pipeline speedup N/(1+(N-1)/M), N=8, M=32", pipeline_speedup(8, 32),
        8 * 32 / (32 + 8 - 1), "x", "ok", "M micro-batches take M+N-1 stage-times: speedup = N*M/(M+N-1), the same")
    add("000 §6", "GPT-J TP=8: 58 ms/sample -> 55 samples/s", 55, 1 / 0.058, "1/s", _arith(55, 1 / 0.058),
        "one sample at a time through 58 ms gives 17 samples/s; DP=8 at 50 ms gives 8/0.05 = 160, so DP is 9.3x, not 3x")
    add("003", "TP comm ~5 ms per layer (NVLink)", 5e-3, comm8, "s", _arith(5e-3, comm8),
        "5 ms is one all-reduce; a layer's forward has two (the tensor-parallel notes §4.1: 9.34 ms)")
    add("003", "PP over IB ~50 ms per batch", 0.050, ar / seed_ib.bandwidth_Bps, "s", "order of magnitude",
        "one boundary, B=32 activation of 1.61 GB at 25 GB/s = 64 ms (divide by M for micro-batches)")
    add("003", "GPT-3 on 512 GPUs, TP=8 x PP=64: '8 nodes x 8 stages/node'", 8, 512 / 8, "nodes",
        "inconsistent", "TP=8 fills an 8-GPU node, so 64 stages need 64 nodes, one stage each; and 96 layers "
        "over 64 stages is 1.5 layers per stage (PP must divide the layers: 32, 48 or 96)")
    return c
