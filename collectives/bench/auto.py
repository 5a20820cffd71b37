"""``algo="auto"``: registered here so the core never imports the tuner (the tuner sits above it)."""
# The tuner's pick for a (size, N) is a pure function of the agreed tuning table, so every rank makes the
# same one; after the first call of a size it is replayed from a per-communicator memo here (the tuner's
# own lookup, imports included, cost a 64 KB call about 10%: docs/results/overhead/).

from ringlab.commstate import comm_state

__all__ = ["register"]

_algorithms = None     # api.ALLREDUCE_ALGORITHMS, bound by register()


def _auto(buf, transport, op="sum", cache=None):
    # Imported on first use, so ``python -m ringlab.bench.tuner`` does not find itself already imported.
    from ringlab.bench.tuner import auto_allreduce_inplace
    auto_allreduce_inplace(buf, transport, op, cache)


def _auto_into(x, out, transport, op="sum", cache=None):
    cache = cache if cache is not None else {}
    comm = transport.comm
    state = comm_state(comm)
    memo = state.get("auto-memo")
    if memo is None:
        memo = state["auto-memo"] = {}
    key = (x.nbytes, comm.size, len(_algorithms))
    name = memo.get(key)
    if name is not None:
        into = getattr(_algorithms[name], "into", None)
        if into is not None:
            cache["last_choice"] = name
            into(x, out, transport, op, cache.setdefault(name, {}))
            return
    from ringlab.bench.tuner import auto_allreduce_into
    auto_allreduce_into(x, out, transport, op, cache)
    memo[key] = cache.get("last_choice")


_auto.into = _auto_into   # out of place without copying the input first, when the pick has such a form


def register():
    """Make ``allreduce(x, algo="auto")`` pick a host algorithm by size and N (bench/tuner.py)."""
    global _algorithms
    from ringlab.api import ALLREDUCE_ALGORITHMS, register_allreduce
    _algorithms = ALLREDUCE_ALGORITHMS
    register_allreduce("auto", _auto)
