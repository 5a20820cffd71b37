"""``torch.distributed`` backend "ringlab": ``init_process_group("ringlab")`` runs c10d's collectives on ringlab."""
#     import ringlab.torch_backend                       # registers the backend (imports torch)
#     ringlab.torch_backend.init_process_group()         # world = MPI.COMM_WORLD, no TCP rendezvous
#     dist.all_reduce(t)                                 # ringlab's ring (async, on its progress thread)
#
# A Python ``ProcessGroup`` subclass (the shape of torch's own multi_threaded_pg): all_reduce,
# all_reduce_coalesced, reduce_scatter (list and ``_single``), all_gather (list and ``_single``) go
# through ringlab's async API; broadcast and barrier (DDP's start-up needs them) go through MPI.
# The group is MPI.COMM_WORLD: ranks come from MPI, the c10d store is not used; ``new_group``
# sub-groups are refused (c10d's plain creator call names no global ranks to build them from).

import socket

import numpy as np
import torch
import torch.distributed as dist
from mpi4py import MPI
from torch._C._distributed_c10d import (AllgatherOptions, AllreduceCoalescedOptions, AllreduceOptions, BarrierOptions,
                                        BroadcastOptions, ReduceOp, ReduceScatterOptions, _create_work_from_future)

from ringlab.arrays import as_array
from ringlab.work import allgather_async, allreduce_async, reduce_scatter_async

__all__ = ["RinglabProcessGroup", "init_process_group", "BACKEND_NAME"]

BACKEND_NAME = "ringlab"
_OPS = {ReduceOp.SUM: "sum", ReduceOp.PRODUCT: "prod", ReduceOp.MAX: "max", ReduceOp.MIN: "min",
        ReduceOp.AVG: "avg"}


def _op_name(opts):
    op = opts.reduceOp
    for key, name in _OPS.items():
        if op == key:
            return name
    raise ValueError(f"ringlab backend: reduce op {op} is not supported (sum, product, max, min, avg are)")


def _done_work(value):
    fut = torch.futures.Future()
    fut.set_result(value)
    return _create_work_from_future(fut)


def _chain(futures, value):
    """One c10d Work that completes when every ringlab future has, with ``value`` as its result."""
    return _create_work_from_future(torch.futures.collect_all(futures).then(lambda f: ([g.wait() for g in f.value()],
                                                                                         value)[1]))


class RinglabProcessGroup(dist.ProcessGroup):
    """c10d process group over ringlab's collectives on ``comm`` (every call is non-blocking)."""

    def __init__(self, rank, size, comm=None, algo="ring"):
        super().__init__(rank, size)
        self.comm, self.algo = (comm if comm is not None else MPI.COMM_WORLD), algo
        if (self.comm.rank, self.comm.size) != (rank, size):
            raise ValueError(f"ringlab backend: c10d rank {rank} of {size} is MPI rank {self.comm.rank} of "
                             f"{self.comm.size}; only the whole MPI world is supported")

    def getBackendName(self):
        return BACKEND_NAME

    def allreduce(self, tensors, opts=AllreduceOptions()):
        op = _op_name(opts)
        return _chain([allreduce_async(t, out=t, op=op, algo=self.algo, comm=self.comm).get_future() for t in tensors],
                      tensors)

    def allreduce_coalesced(self, tensors, opts=AllreduceCoalescedOptions()):
        return self.allreduce(tensors, opts)

    def reduce_scatter_single(self, output, input, opts=ReduceScatterOptions()):
        n = self.size()
        if input.numel() != output.numel() * n:
            raise ValueError(f"reduce_scatter: input has {input.numel()} elements, expected {n} x {output.numel()}")
        fut = reduce_scatter_async(input.reshape(-1), out=output.reshape(-1), op=_op_name(opts), comm=self.comm)
        return _chain([fut.get_future()], output)

    def reduce_scatter(self, outputs, input_lists, opts=ReduceScatterOptions()):
        futures = []
        for out, inputs in zip(outputs, input_lists):
            flat = torch.cat([t.reshape(-1) for t in inputs])
            futures.append(reduce_scatter_async(flat, out=out.reshape(-1), op=_op_name(opts), comm=self.comm)
                           .get_future())
        return _chain(futures, outputs)

    def all_gather_single(self, output, input, opts=AllgatherOptions()):
        out = output.view((self.size(),) + tuple(input.shape))
        return _chain([allgather_async(input, out=out, comm=self.comm).get_future()], output)

    def allgather(self, output_lists, inputs, opts=AllgatherOptions()):
        futures, copies = [], []
        for outs, inp in zip(output_lists, inputs):
            gathered = torch.empty((self.size(),) + tuple(inp.shape), dtype=inp.dtype, device=inp.device)
            futures.append(allgather_async(inp, out=gathered, comm=self.comm).get_future())
            copies.append((outs, gathered))

        def scatter_back(_):
            for outs, gathered in copies:
                for o, g in zip(outs, gathered):
                    o.copy_(g)
            return output_lists
        return _create_work_from_future(torch.futures.collect_all(futures).then(scatter_back))

    def broadcast(self, tensors, opts=BroadcastOptions()):
        for t in tensors:   # DDP's start-up sync of parameters and buffers: blocking MPI on host bytes
            t = t.detach()
            host = t if t.device.type == "cpu" and t.is_contiguous() else t.cpu().contiguous()
            self.comm.Bcast(as_array(host).reshape(-1).view(np.uint8), root=opts.rootRank)
            if host is not t:
                t.copy_(host)
        return _done_work(tensors)

    def barrier(self, opts=BarrierOptions()):
        self.comm.Barrier()
        return _done_work(None)


def _create(store, rank, size, timeout):
    return RinglabProcessGroup(rank, size)


def init_process_group(backend=BACKEND_NAME, comm=None):
    """``dist.init_process_group(backend)`` with ranks from MPI: "ringlab" needs no store (an in-process
    one is passed); any other backend (gloo, nccl) rendezvous at rank 0's host on a port it picked."""
    comm = comm if comm is not None else MPI.COMM_WORLD
    if backend == BACKEND_NAME:
        dist.init_process_group(BACKEND_NAME, store=dist.HashStore(), rank=comm.rank, world_size=comm.size)
        return
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    one_node = node.size == comm.size
    node.Free()
    address = None
    if comm.rank == 0:
        with socket.socket() as s:   # a free port now; the TCP store binds it right after the broadcast
            s.bind(("", 0))
            address = f"tcp://{'127.0.0.1' if one_node else socket.gethostname()}:{s.getsockname()[1]}"
    address = comm.bcast(address, root=0)
    dist.init_process_group(backend, init_method=address, rank=comm.rank, world_size=comm.size)


if BACKEND_NAME.upper() not in dist.Backend._plugins:
    dist.Backend.register_backend(BACKEND_NAME, _create, devices=["cpu", "cuda"])
