"""3D parallelism on 8 ranks: TP/PP/DP groups, Megatron TP layer, sequence parallelism, pipeline, DP gradients.

    mpirun -n 8 python experiments/parallel3d.py                    # TP = PP = DP = 2
    mpirun -n 8 python experiments/parallel3d.py --tp 4 --pp 2 --seq 16 --json p3d.json

Each pattern is checked against a single-rank NumPy reference (the same maths on full weights), and the
bytes its collectives moved (counted at the transport) are compared with the tensor-parallel notes' formulas:
B*S*H*dtype per TP all-reduce, of which a ring sends 2(N-1)/N per rank.
"""
import argparse
import json
import os
import sys

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ringlab.teach import parallel3d as p3d  # noqa: E402
from ringlab.bench.harness import run_metadata  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--pp", type=int, default=2)
    p.add_argument("--batch", type=int, default=2, help="micro-batch size b")
    p.add_argument("--seq", type=int, default=8, help="sequence length S (a multiple of TP for SP)")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--layers-per-stage", type=int, default=1)
    p.add_argument("--microbatches", type=int, default=2)
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--json", metavar="PATH")
    return p.parse_args(argv)


def rel_err(got, ref):
    return float(np.max(np.abs(got.astype(np.float64) - ref)) / max(np.max(np.abs(ref)), 1e-300)) if ref.size else 0.0


def mean_over_ranks(comm, value):
    return comm.allreduce(value, op=MPI.SUM) / comm.size


def main(argv=None):
    a = parse_args(argv)
    comm = MPI.COMM_WORLD
    say = print if comm.rank == 0 else (lambda *x, **k: None)
    dt = np.dtype(a.dtype)
    tol = 1e-12 if dt == np.float64 else 2e-5
    g = p3d.build_groups(comm, a.tp, a.pp)
    table = p3d.format_group_table(comm, g)
    say(f"== groups (Comm.Split by the seed's rank mapping) ==\n{table}")
    B, S, H = a.batch, a.seq, a.hidden
    payload = B * S * H * dt.itemsize          # one TP all-reduce, the tensor-parallel notes: B x S x H x dtype bytes
    results = []

    def record(name, err, measured, formula, note=""):
        ok = err <= tol and abs(measured - formula) <= 1e-9 * max(formula, 1)
        results.append(dict(check=name, rel_err=err, tol=tol, bytes_per_rank=measured, formula_bytes=formula,
                            note=note, ok=bool(comm.allreduce(int(ok), op=MPI.MIN))))

    # the model: PP * layers_per_stage layers, identical on every rank (same seed)
    rng = np.random.default_rng(0)
    layers = [p3d.init_layer(rng, H, a.heads, a.ffn, dt) for _ in range(a.pp * a.layers_per_stage)]
    shards = [p3d.shard_layer(w, a.tp, g.tp_rank) for w in layers]
    x = np.random.default_rng(1).standard_normal((B, S, H)).astype(dt)

    # 1. Megatron TP layer: 2 all-reduces of B*S*H elements
    with p3d.TrafficMeter() as m:
        y = p3d.tp_layer(x, shards[0], g.tp_comm)
    record("TP layer forward (attention + MLP)", rel_err(y, p3d.layer_reference(x.astype(np.float64), layers[0])),
           mean_over_ranks(comm, m.bytes_sent), 2 * p3d.ring_bytes_per_rank(payload, a.tp),
           f"2 all-reduces x {payload} B")

    # 2. sequence parallel: all-gather + reduce-scatter per sub-layer, on [S/TP, B, H] shards
    if S % a.tp == 0:
        xs = np.ascontiguousarray(x.transpose(1, 0, 2)[g.tp_rank * (S // a.tp):(g.tp_rank + 1) * (S // a.tp)])
        with p3d.TrafficMeter() as m:
            ys = p3d.sp_layer(xs, shards[0], g.tp_comm)
        ref = p3d.layer_reference(x.astype(np.float64), layers[0]).transpose(1, 0, 2)
        ref_shard = ref[g.tp_rank * (S // a.tp):(g.tp_rank + 1) * (S // a.tp)]
        record("SP layer forward (AG + RS per sub-layer)", rel_err(ys, ref_shard), mean_over_ranks(comm, m.bytes_sent),
               2 * (p3d.ring_bytes_per_rank(payload, a.tp, "allgather") +
                    p3d.ring_bytes_per_rank(payload, a.tp, "reduce_scatter")), "same bytes as 2 all-reduces")
    else:
        say(f"(sequence parallel skipped: S = {S} is not a multiple of TP = {a.tp})")

    # 3. pipeline: each DP replica feeds its own micro-batches through PP stages of TP layers
    data = np.random.default_rng(10 + g.dp_rank).standard_normal((a.microbatches, B, S, H)).astype(dt)
    mine = shards[g.pp_rank * a.layers_per_stage:(g.pp_rank + 1) * a.layers_per_stage]
    outs, p2p = p3d.pipeline_forward(list(data), mine, g)
    err = 0.0
    if outs is not None:
        ref = data.astype(np.float64)
        for w in layers:
            ref = np.stack([p3d.layer_reference(mb, w) for mb in ref])
        err = rel_err(np.stack(outs), ref)
    err = comm.allreduce(err, op=MPI.MAX)
    total_p2p = comm.allreduce(p2p, op=MPI.SUM) / g.dp / g.tp      # per replica, per TP lane
    record(f"PP forward ({a.pp} stages x {a.layers_per_stage} layer, {a.microbatches} micro-batches)", err,
           total_p2p, (a.pp - 1) * a.microbatches * payload, "(PP-1) x M x b*S*H*dtype per pipeline")

    # 4. DP gradient all-reduce (avg) of the TP-sharded MLP gradients
    xd = np.random.default_rng(20 + g.dp_rank).standard_normal((B, S, H)).astype(dt)
    with p3d.TrafficMeter() as m:
        dw1, dw2 = p3d.tp_mlp_grads(xd, shards[0], g)
    everyone = np.concatenate([np.random.default_rng(20 + d).standard_normal((B, S, H)) for d in range(g.dp)])
    r1, r2 = p3d.mlp_grads_reference(everyone.astype(dt).astype(np.float64), layers[0])
    err = max(rel_err(dw1, p3d.shard_columns(r1, a.tp, g.tp_rank)), rel_err(dw2, p3d.shard_rows(r2, a.tp, g.tp_rank)))
    grad_bytes = dw1.nbytes + dw2.nbytes
    record("DP gradient all-reduce (+1 TP fwd all-reduce)", comm.allreduce(err, op=MPI.MAX),
           mean_over_ranks(comm, m.bytes_sent),
           p3d.ring_bytes_per_rank(payload, a.tp) + p3d.ring_bytes_per_rank(grad_bytes, g.dp),
           f"grad shard {grad_bytes} B over DP = {g.dp}")

    say(f"\n== checks (B={B}, S={S}, H={H}, heads={a.heads}, ffn={a.ffn}, {a.dtype}; reference: one-rank NumPy) ==")
    say(f"{'check':<52s} {'rel err':>9s} {'tol':>8s} {'bytes/rank':>11s} {'formula':>11s}  result")
    for r in results:
        say(f"{r['check']:<52s} {r['rel_err']:9.2e} {r['tol']:8.0e} {r['bytes_per_rank']:11.1f} "
            f"{r['formula_bytes']:11.1f}  {'PASS' if r['ok'] else 'FAIL'}  {r['note']}")
    if a.json and comm.rank == 0:
        with open(a.json, "w") as f:
            json.dump({"meta": run_metadata(comm, tp=a.tp, pp=a.pp, dp=g.dp), "groups": table, "checks": results},
                      f, indent=1)
    g.free()
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
