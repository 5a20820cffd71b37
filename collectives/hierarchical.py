"""Hierarchical all-reduce: intra-node reduce-scatter, inter-node all-reduce per shard, intra-node all-gather."""
#     node 0: ranks 0 1 | node 1: ranks 2 3 | ...        (ranks_per_node L = 2, M nodes)
#
#     1. reduce-scatter inside each node (ring, L ranks): local rank i owns shard i of the node's sum
#     2. all-reduce shard i across the M ranks with local rank i (one per node): the only traffic
#        that crosses nodes, S/L bytes per rank instead of S
#     3. all-gather inside each node: every rank ends with every shard
#
# Cost: 2(L-1) alpha_intra + 2(L-1)/L S/beta_intra + [inter algorithm on S/L bytes over M ranks].
#
# The node size comes from ``ranks_per_node`` (argument), else $RINGLAB_RANKS_PER_NODE, else MPI's
# shared-memory split (the real node). Declaring it lets one machine pretend to be several nodes:
# 8 ranks with L = 2 are 4 "nodes", with the inter-node leg on a real ``comm.Split`` communicator.
# Nodes must all have L ranks (N divisible by L): shard i must line up across nodes, so an uneven
# layout raises a clear error on every rank rather than reducing misaligned data.

import numpy as np
from mpi4py import MPI

from ringlab import settings
from ringlab.commstate import comm_state
from ringlab.ring import divide_inplace, ring_allgather_inplace, ring_allreduce_inplace, ring_reduce_scatter_inplace
from ringlab.ring_outofplace import ring_reduce_scatter_slots
from ringlab.schedule import chunk_bounds
from ringlab.transport import MpiTransport
from ringlab.validate import InvalidCollectiveCall

__all__ = ["NodeLayout", "node_layout", "hierarchical_allreduce_inplace", "hierarchical_allreduce_into",
           "make_hierarchical", "register_all"]

ENV_RANKS_PER_NODE = "RINGLAB_RANKS_PER_NODE"


class NodeLayout:
    """The two sub-communicators of a hierarchical collective, built once per (comm, L)."""

    def __init__(self, comm, ranks_per_node):
        n, r, L = comm.size, comm.rank, ranks_per_node
        self.ranks_per_node, self.nodes = L, n // L
        self.node, self.local_rank = r // L, r % L
        # intra: the L ranks of my node; inter: the ranks with my local index, one per node
        self.intra = comm.Split(color=self.node, key=r)
        self.inter = comm.Split(color=self.local_rank, key=r)

    def free(self):
        self.intra.Free()
        self.inter.Free()


def _declared_ranks_per_node(comm, ranks_per_node):
    if ranks_per_node is not None:
        return int(ranks_per_node), "argument"
    declared = settings.get(ENV_RANKS_PER_NODE)
    if declared is not None:
        return declared, f"${ENV_RANKS_PER_NODE}"
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return shared.size, "MPI shared-memory split"
    finally:
        shared.Free()


def node_layout(comm, ranks_per_node=None, cache=None):
    """Agree on L across ranks, check N % L == 0, and return the (cached) NodeLayout.

    Collective: every rank checks the same agreed values, so a bad L raises the same InvalidCollectiveCall
    (a ValueError) on every rank before any data moves.
    """
    L, source = _declared_ranks_per_node(comm, ranks_per_node)
    cache = comm_state(comm)   # lives as long as comm: a freed handle reused by MPI never hits it
    key = ("hierarchical-layout", L)
    if key in cache:   # agreed on and split once already; the steady state costs no extra messages
        return cache[key]
    lo, hi = comm.allreduce(L, op=MPI.MIN), comm.allreduce(L, op=MPI.MAX)
    if lo != hi:
        raise InvalidCollectiveCall(f"hierarchical all-reduce: ranks disagree on ranks_per_node ({lo} .. {hi}, from "
                         f"{source}); nodes of unequal size are not supported, set {ENV_RANKS_PER_NODE}")
    if L < 1:
        raise InvalidCollectiveCall(f"hierarchical all-reduce: ranks_per_node must be >= 1, got {source}")
    if comm.size % L:
        raise InvalidCollectiveCall(f"hierarchical all-reduce: N = {comm.size} ranks is not divisible by ranks_per_node "
                         f"= {L} (from {source}); shards would not line up across nodes. Use an N that is a "
                         f"multiple of {L}, another ranks_per_node, or another algorithm")
    layout = cache[key] = NodeLayout(comm, L)
    return layout


def _ring(buf, transport, op, cache):
    ring_allreduce_inplace(buf, transport, op, cache=cache)


def hierarchical_allreduce_inplace(buf, transport, op="sum", cache=None, ranks_per_node=None, inter_algo=None):
    """Hierarchical all-reduce of a flat host buffer, in place (see the module docstring).

    ``inter_algo(shard, transport, op, cache)`` reduces each shard across nodes (default: the ring);
    it gets op "sum" for ``avg``, and the shard is divided once afterwards, before the all-gather, so
    every rank receives the same divided bytes.
    """
    cache = cache if cache is not None else {}
    comm = transport.comm
    layout = node_layout(comm, ranks_per_node, cache)
    L = layout.ranks_per_node
    intra = MpiTransport(layout.intra, timeout=transport.timeout, tag=transport.tag)
    inter = MpiTransport(layout.inter, timeout=transport.timeout, tag=transport.tag)
    acc_op = "sum" if op == "avg" else op
    # rotate=-1: local rank i ends owning chunk i, which is also the chunk its inter peers own
    ring_reduce_scatter_inplace(buf, intra, acc_op, rotate=-1, cache=cache.setdefault("intra", {}))
    lo, hi = chunk_bounds(buf.size, L)[layout.local_rank]
    shard = buf[lo:hi]
    if layout.nodes > 1:
        inter_algo = inter_algo or _ring
        inter_algo(shard, inter, acc_op, cache.setdefault("inter", {}))
    if op == "avg":
        divide_inplace(shard, comm.size)
    ring_allgather_inplace(buf, intra, rotate=-1)


def hierarchical_allreduce_into(x, out, transport, op="sum", ranks_per_node=None, inter_algo=None):
    """The same, out of place (``x`` only read): peak memory input + output + the inter leg's scratch of
    one shard / M, which lives in a chunk of ``out`` that holds only partial sums until the all-gather."""
    comm = transport.comm
    layout = node_layout(comm, ranks_per_node)
    L = layout.ranks_per_node
    intra = MpiTransport(layout.intra, timeout=transport.timeout, tag=transport.tag)
    inter = MpiTransport(layout.inter, timeout=transport.timeout, tag=transport.tag)
    acc_op = "sum" if op == "avg" else op
    lo, hi = ring_reduce_scatter_slots(x, out, intra, acc_op, rotate=-1)
    shard = out[lo:hi]
    if layout.nodes > 1:
        scratch = {}
        if L > 1:   # seed the inter algorithm's receive buffers with another chunk's (stale) bytes
            f0, f1 = chunk_bounds(out.size, L)[(layout.local_rank + 1) % L]
            scratch = {"recv": out[f0:f1].view(np.uint8), "fold": out[f0:f1].view(np.uint8)}
        (inter_algo or _ring)(shard, inter, acc_op, scratch)
    if op == "avg":
        divide_inplace(shard, comm.size)
    ring_allgather_inplace(out, intra, rotate=-1)
    return out


def make_hierarchical(ranks_per_node=None, inter="ring"):
    """A registrable ``fn(buf, transport, op, cache)`` with a fixed node size and inter-node algorithm name."""
    def fn(buf, transport, op, cache):
        from ringlab.api import ALLREDUCE_ALGORITHMS
        inter_fn = ALLREDUCE_ALGORITHMS[inter]
        hierarchical_allreduce_inplace(buf, transport, op, cache, ranks_per_node=ranks_per_node,
                                       inter_algo=inter_fn)

    def into(x, out, transport, op, cache):
        from ringlab.api import ALLREDUCE_ALGORITHMS
        hierarchical_allreduce_into(x, out, transport, op, ranks_per_node, ALLREDUCE_ALGORITHMS[inter])
    fn.into = into
    return fn


def register_all():
    """``hierarchical`` (ring across nodes) and ``hierarchical_rd`` (recursive doubling across nodes)."""
    from ringlab.api import register_allreduce
    register_allreduce("hierarchical", make_hierarchical(inter="ring"))
    register_allreduce("hierarchical_rd", make_hierarchical(inter="recursive_doubling"))
