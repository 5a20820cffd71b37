"""Overlap communication with computation: DDP-style gradient buckets and a TP-style matmul pipeline."""
# Data parallel (DDP): backward produces gradients from the last layer to the first. Gradients are
# written straight into flat *buckets* of about ``bucket_bytes``; a bucket's all-reduce starts the
# moment its last gradient is written, while backward goes on with earlier layers:
#
#     compute  | L7 | L6 | L5 | L4 | L3 | L2 | L1 | L0 |
#     comm               [bucket L7+L6] [bucket L5+L4] [L3+L2]  [L1+L0]  <- only this tail is exposed
#
# Tensor parallel (row-parallel linear): rank r holds X[:, K_r] and W[K_r, :]; Y = sum_r X_r W_r
# needs an all-reduce of an m x n partial product. Split the m rows into k blocks: block i's
# all-reduce runs while block i+1 is multiplied, so only the last block's all-reduce is exposed.
#
# Both patterns offer ``compute()``, ``communicate()`` and ``overlapped()`` with the same kernels,
# so T_comp, T_comm and T_both are measured on identical work (experiments/overlap.py).

import numpy as np
from mpi4py import MPI

from ringlab.schedule import chunk_bounds
from ringlab.work import allreduce_async

__all__ = ["GradientBuckets", "bucketed_allreduce", "SimulatedBackward", "DataParallelStep",
           "RowParallelMatmul", "row_parallel_operands", "row_parallel_reference"]


class GradientBuckets:
    """Gradients of ``shapes`` fused into buckets of about ``bucket_bytes`` each (DDP's buckets).

    Tensors are packed in reverse order (the order backward produces them); a bucket closes once
    it holds at least ``bucket_bytes``, so a tensor larger than the cap gets a bucket of its own.
    Write tensor i's gradient into ``grad(i)``, call ``mark_ready(i)``; ``wait()`` returns the
    reduced gradients (views of the bucket storage), in the original order.
    """

    def __init__(self, shapes, dtype="float32", bucket_bytes=25 << 20, comm=None, op="avg", xp=np,
                 timeout=None, validate=True):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be > 0, got {bucket_bytes}")
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        self.op, self.timeout, self.validate = op, timeout, validate
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        itemsize = np.dtype(dtype).itemsize
        self.buckets = []           # list of (tensor indices, flat input, flat output)
        self._where = {}            # tensor index -> (bucket index, offset, size)
        members, size = [], 0
        for i in reversed(range(len(self.shapes))):
            members.append(i)
            size += int(np.prod(self.shapes[i]))
            if size * itemsize >= bucket_bytes or i == 0:
                self._add_bucket(members, size, dtype, xp)
                members, size = [], 0
        self._reset()

    def _reset(self):
        self._pending = [len(b[0]) for b in self.buckets]
        self._works = [None] * len(self.buckets)
        self._marked = set()

    def _add_bucket(self, members, size, dtype, xp):
        b, offset = len(self.buckets), 0
        for i in members:
            n = int(np.prod(self.shapes[i]))
            self._where[i] = (b, offset, n)
            offset += n
        self.buckets.append((tuple(members), xp.zeros(size, dtype=dtype), xp.zeros(size, dtype=dtype)))

    @property
    def bucket_nbytes(self):
        return [flat.nbytes for _, flat, _ in self.buckets]

    def grad(self, i):
        """Where tensor i's gradient must be written (a view of its bucket's input)."""
        b, off, n = self._where[i]
        return self.buckets[b][1][off:off + n].reshape(self.shapes[i])

    def reduced(self, i):
        """Tensor i's reduced gradient (a view of its bucket's output), valid after ``wait()``."""
        b, off, n = self._where[i]
        return self.buckets[b][2][off:off + n].reshape(self.shapes[i])

    def mark_ready(self, i):
        """Tensor i's gradient is written; launch its bucket's all-reduce if it was the last one."""
        if i in self._marked:
            raise ValueError(f"tensor {i} marked ready twice in one step")
        self._marked.add(i)
        b = self._where[i][0]
        self._pending[b] -= 1
        if self._pending[b] == 0:
            self._launch(b)

    def _launch(self, b):
        _, flat_in, flat_out = self.buckets[b]
        # Out of place: the input keeps this rank's gradients, so a step can be repeated as is.
        self._works[b] = allreduce_async(flat_in, out=flat_out, op=self.op, comm=self.comm,
                                         timeout=self.timeout, validate=self.validate)

    def launch_all(self):
        """Launch every bucket now (the comm-only measurement: gradients already in place)."""
        if self._marked or any(w is not None for w in self._works):
            raise RuntimeError("launch_all() in the middle of a step (some gradients already marked ready)")
        for b in range(len(self.buckets)):
            self._pending[b] = 0
            self._launch(b)

    def wait(self, timeout=None):
        """Wait for every bucket, reset for the next step, return the reduced gradients."""
        missing = [i for i, (b, _, _) in self._where.items() if self._works[b] is None]
        try:
            for w in self._works:
                if w is not None:
                    w.wait(timeout)
        finally:
            self._reset()
        if missing:
            raise RuntimeError(f"gradients {sorted(missing)} were never marked ready; their buckets "
                               "never started (every rank must mark every tensor each step)")
        return [self.reduced(i) for i in range(len(self.shapes))]


def bucketed_allreduce(tensors, bucket_bytes=25 << 20, op="sum", comm=None, timeout=None):
    """All-reduce a list of same-dtype arrays through fused buckets; same values as one
    ``allreduce`` per tensor. Returns new arrays (views of the bucket storage)."""
    if not tensors:
        return []
    xp = _array_module(tensors[0])
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        raise TypeError(f"bucketed_allreduce needs one dtype, got {sorted({str(t.dtype) for t in tensors})}")
    buckets = GradientBuckets([t.shape for t in tensors], dtype, bucket_bytes, comm, op, xp, timeout)
    for i in reversed(range(len(tensors))):
        buckets.grad(i)[...] = tensors[i]
        buckets.mark_ready(i)
    return buckets.wait(timeout)


def _array_module(a):
    from ringlab.arrays import array_module
    return array_module(a)


def _small_ints(shape, salt, xp):
    """Deterministic integers in [-2, 2]: exact in float32, so every sum below is exact too."""
    i = xp.arange(int(np.prod(shape)), dtype=xp.int64)
    return (((i * 7 + (i // 13) * 3 + salt * 5) % 5) - 2).reshape(shape)


class SimulatedBackward:
    """Backward pass of ``layers`` linear layers (hidden x hidden) on a batch: real matmuls.

    Per layer, last to first: the input gradient dX = dY W^T and the weight gradient
    dW = A^T dY (2 * 2 * batch * hidden^2 flops). Rank r's activations are (r+1) * A, so the
    all-reduced dW has the closed form sum_r (r+1) * A^T dY (see ``reference``).
    """

    def __init__(self, layers, hidden, batch, dtype="float32", rank=0, xp=np):
        if layers < 1 or hidden < 1 or batch < 1:
            raise ValueError(f"layers, hidden and batch must be >= 1, got {layers}, {hidden}, {batch}")
        self.layers, self.hidden, self.batch, self.xp = layers, hidden, batch, xp
        self.a = [(_small_ints((batch, hidden), 2 * l, xp) * (rank + 1)).astype(dtype) for l in range(layers)]
        self.dy = [_small_ints((batch, hidden), 2 * l + 1, xp).astype(dtype) for l in range(layers)]
        self.w = _small_ints((hidden, hidden), 99, xp).astype(dtype)
        self.dx = xp.empty((batch, hidden), dtype=dtype)

    @property
    def shapes(self):
        return [(self.hidden, self.hidden)] * self.layers

    @property
    def flops(self):
        return 4 * self.batch * self.hidden ** 2 * self.layers

    def run(self, grad_out, on_ready=None):
        """Compute every layer's weight gradient into ``grad_out(l)``, last layer first."""
        xp = self.xp
        for l in reversed(range(self.layers)):
            xp.matmul(self.dy[l], self.w.T, out=self.dx)      # real work a backward does; not reduced
            xp.matmul(self.a[l].T, self.dy[l], out=grad_out(l))
            if on_ready is not None:
                on_ready(l)

    def reference(self, l, nranks, op="avg"):
        """float64 all-reduced gradient of layer l, from the closed form (no communication)."""
        xp = self.xp
        base = _small_ints((self.batch, self.hidden), 2 * l, xp).astype(xp.float64).T @ \
            _small_ints((self.batch, self.hidden), 2 * l + 1, xp).astype(xp.float64)
        total = base * (nranks * (nranks + 1) // 2)
        return total / nranks if op == "avg" else total


class DataParallelStep:
    """One DDP step = simulated backward + bucketed gradient all-reduce, three ways."""

    def __init__(self, backward, buckets):
        self.backward, self.buckets = backward, buckets

    def compute(self):
        """Backward only (T_comp)."""
        self.backward.run(self.buckets.grad)

    def communicate(self, timeout=None):
        """Every bucket's all-reduce on the gradients already in place (T_comm)."""
        self.buckets.launch_all()
        return self.buckets.wait(timeout)

    def overlapped(self, timeout=None):
        """Backward, each bucket's all-reduce launched as soon as it is ready (T_both)."""
        self.backward.run(self.buckets.grad, self.buckets.mark_ready)
        return self.buckets.wait(timeout)


def row_parallel_operands(m, k_local, n, rank, dtype="float32", xp=np):
    """Rank ``rank``'s slice of a row-parallel matmul: X[:, K_r] (m x k_local), W[K_r, :] (k_local x n)."""
    x = _small_ints((m, k_local), 1000 + rank, xp).astype(dtype)
    w = _small_ints((k_local, n), 2000 + rank, xp).astype(dtype)
    return x, w


def row_parallel_reference(m, k_local, n, nranks, xp=np):
    """float64 X @ W of the unsplit matmul, X and W rebuilt from every rank's slice."""
    parts = [row_parallel_operands(m, k_local, n, r, "float64", xp) for r in range(nranks)]
    x = xp.concatenate([p[0] for p in parts], axis=1)
    w = xp.concatenate([p[1] for p in parts], axis=0)
    return x @ w


class RowParallelMatmul:
    """Y = sum over ranks of X_r @ W_r, computed in ``chunks`` row blocks (TP-style pipeline).

    Block i is multiplied into ``partial`` and its all-reduce (into ``out``) is launched; the
    next block's matmul then runs while block i's all-reduce progresses.
    """

    def __init__(self, x_local, w_local, chunks, comm=None, op="sum", timeout=None, validate=True):
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        if x_local.shape[1] != w_local.shape[0]:
            raise ValueError(f"x_local is {x_local.shape} but w_local is {w_local.shape}: inner sizes differ")
        xp = _array_module(x_local)
        m, n = x_local.shape[0], w_local.shape[1]
        self.x, self.w, self.comm, self.op = x_local, w_local, comm, op
        self.timeout, self.validate = timeout, validate
        # Empty blocks (chunks > m) are skipped: a zero-row all-reduce would only add latency.
        self.rows = [(lo, hi) for lo, hi in chunk_bounds(m, chunks) if hi > lo]
        self.partial = xp.empty((m, n), dtype=x_local.dtype)
        self.out = xp.empty((m, n), dtype=x_local.dtype)

    @property
    def flops(self):
        return 2 * self.x.shape[0] * self.x.shape[1] * self.w.shape[1]

    def _matmul(self, lo, hi):
        _array_module(self.x).matmul(self.x[lo:hi], self.w, out=self.partial[lo:hi])

    def _allreduce(self, lo, hi):
        return allreduce_async(self.partial[lo:hi], out=self.out[lo:hi], op=self.op, comm=self.comm,
                               timeout=self.timeout, validate=self.validate)

    def compute(self):
        """Every block's matmul, no communication (T_comp)."""
        for lo, hi in self.rows:
            self._matmul(lo, hi)

    def communicate(self, timeout=None):
        """Every block's all-reduce on the partial products already in place (T_comm)."""
        for w in [self._allreduce(lo, hi) for lo, hi in self.rows]:
            w.wait(timeout)
        return self.out

    def overlapped(self, timeout=None):
        """Block i's all-reduce runs while block i+1 is multiplied (T_both)."""
        works = []
        for lo, hi in self.rows:
            self._matmul(lo, hi)
            works.append(self._allreduce(lo, hi))
        for w in works:
            w.wait(timeout)
        return self.out
