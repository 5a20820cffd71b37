"""3D parallelism on ringlab collectives: TP, PP and DP groups, Megatron tensor parallelism, sequence
parallelism, pipeline stages and the data-parallel gradient all-reduce (the DP, TP and 3D-parallelism notes)."""
# Rank mapping (the 3D-parallelism notes): tp = r % TP, pp = (r // TP) % PP, dp = r // (TP * PP). With TP = PP = DP = 2:
#
#     rank  tp pp dp   TP group   PP group   DP group
#       0    0  0  0   0,1        0,2        0,4
#       5    1  0  1   4,5        5,7        1,5
#
# Tensor parallelism (Megatron, the tensor-parallel notes): a column-parallel matmul needs no communication (each rank
# computes its own output columns); the row-parallel matmul that follows produces partial sums that one
# all-reduce of B*S*H elements completes. Attention (heads split) and the MLP (hidden split) each end in
# one, so a layer's forward costs 2 all-reduces. Sequence parallelism replaces each all-reduce with an
# all-gather (before the column-parallel matmul) and a reduce-scatter (after the row-parallel one) on
# sequence shards: the same bytes, but activations outside the matmuls are stored 1/TP each.
#
# Every function here is checked against ``*_reference`` (the same maths on one rank, NumPy).

import math
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from ringlab.api import allgather, allreduce, reduce_scatter
from ringlab.algorithms import NonblockingTransport
from ringlab.transport import MpiTransport

__all__ = ["coordinates", "ParallelGroups", "build_groups", "format_group_table", "TrafficMeter",
           "shard_columns", "shard_rows", "init_layer", "shard_layer", "gelu", "gelu_grad",
           "attention_reference", "mlp_reference", "layer_reference", "tp_attention", "tp_mlp", "tp_layer",
           "sp_layer", "pipeline_forward", "mlp_grads_reference", "tp_mlp_grads", "ring_bytes_per_rank"]


def coordinates(rank, tp, pp):
    """(tp_rank, pp_rank, dp_rank) of ``rank`` (the 3D-parallelism notes' formulas)."""
    return rank % tp, (rank // tp) % pp, rank // (tp * pp)


@dataclass
class ParallelGroups:
    tp: int
    pp: int
    dp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    tp_comm: MPI.Comm
    pp_comm: MPI.Comm
    dp_comm: MPI.Comm

    def members(self, rank):
        """(TP, PP, DP) group members of ``rank``: consecutive ranks, stride TP, stride TP*PP."""
        t, p, d = coordinates(rank, self.tp, self.pp)
        base_tp = rank - t
        tp_members = [base_tp + i for i in range(self.tp)]
        pp_members = [rank - p * self.tp + i * self.tp for i in range(self.pp)]
        dp_members = [rank - d * self.tp * self.pp + i * self.tp * self.pp for i in range(self.dp)]
        return tp_members, pp_members, dp_members

    def free(self):
        for c in (self.tp_comm, self.pp_comm, self.dp_comm):
            c.Free()


def build_groups(comm, tp, pp):
    """Split ``comm`` into TP, PP and DP communicators (key = world rank keeps the seed's order)."""
    n = comm.size
    if tp < 1 or pp < 1 or n % (tp * pp):
        raise ValueError(f"N = {n} ranks cannot be split into TP = {tp} x PP = {pp} x DP: N must be a multiple "
                         f"of TP * PP = {tp * pp}")
    r = comm.rank
    t, p, d = coordinates(r, tp, pp)
    # colour = the coordinates the group members share
    tp_comm = comm.Split(color=p + pp * d, key=r)
    pp_comm = comm.Split(color=t + tp * d, key=r)
    dp_comm = comm.Split(color=t + tp * p, key=r)
    return ParallelGroups(tp, pp, n // (tp * pp), t, p, d, tp_comm, pp_comm, dp_comm)


def format_group_table(comm, groups):
    """The rank table (gathered to rank 0, None elsewhere), each group as this rank's communicator sees it."""
    world = comm.Get_group()
    mine = []
    for c in (groups.tp_comm, groups.pp_comm, groups.dp_comm):
        mine.append(MPI.Group.Translate_ranks(c.Get_group(), list(range(c.size)), world))
    rows = comm.gather((comm.rank, coordinates(comm.rank, groups.tp, groups.pp), mine), root=0)
    if rows is None:
        return None
    lines = [f"TP = {groups.tp}, PP = {groups.pp}, DP = {groups.dp}  "
             f"(tp = r % TP, pp = (r // TP) % PP, dp = r // (TP*PP))",
             f"{'rank':>4s} {'tp':>3s} {'pp':>3s} {'dp':>3s}   {'TP group':<14s} {'PP group':<14s} {'DP group':<14s}"]
    for r, (t, p, d), groups_of in sorted(rows):
        cells = [",".join(map(str, g)) for g in groups_of]
        lines.append(f"{r:>4d} {t:>3d} {p:>3d} {d:>3d}   {cells[0]:<14s} {cells[1]:<14s} {cells[2]:<14s}")
    return "\n".join(lines)


class TrafficMeter:
    """Counts the payload bytes this rank's ring transfers send while active (wraps MpiTransport.sendrecv,
    which every ring reduce-scatter/all-gather step goes through; metadata checks are not counted)."""

    def __enter__(self):
        self.bytes_sent, self.calls = 0, 0
        self._orig = MpiTransport.sendrecv
        meter = self

        def counted(transport, sendbuf, dest, recvbuf, source, what=""):
            meter.bytes_sent += sendbuf.nbytes
            meter.calls += 1
            return meter._orig(transport, sendbuf, dest, recvbuf, source, what)
        MpiTransport.sendrecv = counted
        return self

    def __exit__(self, *exc):
        MpiTransport.sendrecv = self._orig
        return False


def ring_bytes_per_rank(nbytes, n, collective="allreduce"):
    """the tensor-parallel notes's formula: a ring all-reduce sends 2(N-1)/N * S per rank; RS and AG (N-1)/N * S each."""
    factor = 2 * (n - 1) / n if collective == "allreduce" else (n - 1) / n
    return factor * nbytes


# ---- model pieces ---------------------------------------------------------------------------------

def gelu(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_grad(x):
    c = math.sqrt(2 / math.pi)
    t = np.tanh(c * (x + 0.044715 * x ** 3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t ** 2) * c * (1 + 3 * 0.044715 * x ** 2)


def init_layer(rng, hidden, heads, ffn, dtype=np.float64):
    """Full (unsharded) weights of one layer: attention wq, wk, wv, wo and MLP w1, w2."""
    s = 1 / math.sqrt(hidden)
    w = {k: rng.standard_normal((hidden, hidden)) * s for k in ("wq", "wk", "wv", "wo")}
    w["w1"] = rng.standard_normal((hidden, ffn)) * s
    w["w2"] = rng.standard_normal((ffn, hidden)) / math.sqrt(ffn)
    w = {k: v.astype(dtype) for k, v in w.items()}
    w["heads"] = heads
    return w


def shard_columns(w, parts, index):
    """Column-parallel shard: output features split contiguously."""
    if w.shape[1] % parts:
        raise ValueError(f"{w.shape[1]} columns do not split into {parts} tensor-parallel shards")
    k = w.shape[1] // parts
    return np.ascontiguousarray(w[:, index * k:(index + 1) * k])


def shard_rows(w, parts, index):
    """Row-parallel shard: input features split contiguously (matches the column shard before it)."""
    if w.shape[0] % parts:
        raise ValueError(f"{w.shape[0]} rows do not split into {parts} tensor-parallel shards")
    k = w.shape[0] // parts
    return np.ascontiguousarray(w[index * k:(index + 1) * k])


def shard_layer(w, tp, tp_rank):
    """This rank's slice: heads and FFN hidden units split tp ways."""
    if w["heads"] % tp:
        raise ValueError(f"{w['heads']} heads do not split into TP = {tp}")
    out = {k: shard_columns(w[k], tp, tp_rank) for k in ("wq", "wk", "wv", "w1")}
    out.update(wo=shard_rows(w["wo"], tp, tp_rank), w2=shard_rows(w["w2"], tp, tp_rank), heads=w["heads"] // tp)
    return out


def _attention_core(x, wq, wk, wv, heads):
    """softmax(q k^T / sqrt(d)) v per head for x [B, S, H]; returns the concatenated heads [B, S, heads*d]."""
    B, S, _ = x.shape
    q, k, v = (x @ w for w in (wq, wk, wv))
    d = q.shape[-1] // heads
    q, k, v = (t.reshape(B, S, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d)
    scores = np.exp(scores - scores.max(-1, keepdims=True))
    ctx = (scores / scores.sum(-1, keepdims=True)) @ v
    return ctx.transpose(0, 2, 1, 3).reshape(B, S, heads * d)


def attention_reference(x, w):
    return _attention_core(x, w["wq"], w["wk"], w["wv"], w["heads"]) @ w["wo"]


def mlp_reference(x, w):
    return gelu(x @ w["w1"]) @ w["w2"]


def layer_reference(x, w):
    y = x + attention_reference(x, w)
    return y + mlp_reference(y, w)


def tp_attention(x, ws, comm):
    """Heads split (column-parallel q, k, v), output projection row-parallel, then all-reduce 1."""
    partial = _attention_core(x, ws["wq"], ws["wk"], ws["wv"], ws["heads"]) @ ws["wo"]
    return allreduce(partial, out=partial, comm=comm)


def tp_mlp(x, ws, comm):
    """w1 column-parallel (gelu is elementwise, so it applies per shard), w2 row-parallel, then all-reduce 2."""
    partial = gelu(x @ ws["w1"]) @ ws["w2"]
    return allreduce(partial, out=partial, comm=comm)


def tp_layer(x, ws, comm):
    """One Megatron layer forward on replicated x [B, S, H]: exactly 2 all-reduces of B*S*H elements."""
    y = x + tp_attention(x, ws, comm)
    return y + tp_mlp(y, ws, comm)


def _sp_gather(x_shard, comm):
    """[S/TP, B, H] sequence shard -> full [S, B, H] (all-gather stacks the shards in rank order)."""
    return allgather(x_shard, comm=comm).reshape((-1,) + x_shard.shape[1:])


def _sp_scatter(partial, comm):
    """Reduce-scatter the [S, B, H] partial sums; rank r's flat chunk is sequence shard r because the
    sequence is the outermost axis and S is a multiple of TP (equal chunks)."""
    n = comm.size
    return reduce_scatter(partial, comm=comm).reshape((partial.shape[0] // n,) + partial.shape[1:])


def sp_layer(x_shard, ws, comm):
    """Sequence-parallel layer on x_shard [S/TP, B, H] (Megatron-SP's s, b, h layout): each all-reduce
    becomes all-gather before the column-parallel matmul + reduce-scatter after the row-parallel one."""
    if x_shard.shape[0] == 0:
        raise ValueError("sequence shard is empty: S must be a positive multiple of TP")
    full = _sp_gather(x_shard, comm).transpose(1, 0, 2)          # [B, S, H] for the attention maths
    attn = _attention_core(full, ws["wq"], ws["wk"], ws["wv"], ws["heads"]) @ ws["wo"]
    y_shard = x_shard + _sp_scatter(np.ascontiguousarray(attn.transpose(1, 0, 2)), comm)
    y_full = _sp_gather(y_shard, comm)
    mlp = gelu(y_full @ ws["w1"]) @ ws["w2"]
    return y_shard + _sp_scatter(np.ascontiguousarray(mlp), comm)


def pipeline_forward(microbatches, stage_layers, groups, timeout=None):
    """GPipe-style forward: stage 0 feeds ``microbatches``; each stage runs its TP layers and sends the
    activation [b, S, H] to the next stage (same tp and dp coordinates). Returns (outputs on the last
    stage else None, bytes sent point-to-point by this rank)."""
    pp, stage = groups.pp, groups.pp_rank
    tr = NonblockingTransport(groups.pp_comm, **({} if timeout is None else {"timeout": timeout}))
    outputs, sent = [], 0
    for m, mb in enumerate(microbatches):
        x = mb if stage == 0 else np.empty_like(mb)
        if stage > 0:
            tr.recv(x, stage - 1, what=f"pipeline activation, micro-batch {m}")
        for ws in stage_layers:
            x = tp_layer(x, ws, groups.tp_comm)
        if stage < pp - 1:
            tr.send(np.ascontiguousarray(x), stage + 1, what=f"pipeline activation, micro-batch {m}")
            sent += x.nbytes
        else:
            outputs.append(x)
    return (outputs if stage == pp - 1 else None), sent


# ---- data-parallel gradients ---------------------------------------------------------------------

def mlp_grads_reference(x, w):
    """d/dW1, d/dW2 of loss = mean over tokens of 0.5 * |mlp(x)|^2 (full weights, one rank)."""
    tokens = x.shape[0] * x.shape[1]
    a = x @ w["w1"]
    h = gelu(a)
    z = h @ w["w2"]
    dz = z / tokens
    dw2 = h.reshape(tokens, -1).T @ dz.reshape(tokens, -1)
    da = (dz @ w["w2"].T) * gelu_grad(a)
    dw1 = x.reshape(tokens, -1).T @ da.reshape(tokens, -1)
    return dw1, dw2


def tp_mlp_grads(x, ws, groups):
    """This rank's gradient shards for its DP batch ``x``: forward all-reduce on TP, local backward for
    the shard (the full dz is replicated after the all-reduce), then the DP all-reduce (avg) of the
    gradients, so every replica ends with the gradient of the global mean loss."""
    tokens = x.shape[0] * x.shape[1]
    a = x @ ws["w1"]
    h = gelu(a)
    z = allreduce(h @ ws["w2"], comm=groups.tp_comm)
    dz = z / tokens
    dw2 = h.reshape(tokens, -1).T @ dz.reshape(tokens, -1)
    dw1 = x.reshape(tokens, -1).T @ ((dz @ ws["w2"].T) * gelu_grad(a)).reshape(tokens, -1)
    flat = np.concatenate([dw1.ravel(), dw2.ravel()])
    allreduce(flat, out=flat, op="avg", comm=groups.dp_comm)
    return flat[:dw1.size].reshape(dw1.shape), flat[dw1.size:].reshape(dw2.shape)
