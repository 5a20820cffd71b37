"""``algo="auto"``: registered here so the core never imports the tuner (the tuner sits above it)."""

__all__ = ["register"]


def _auto(buf, transport, op="sum", cache=None):
    # Imported on first use, so ``python -m ringlab.bench.tuner`` does not find itself already imported.
    from ringlab.bench.tuner import auto_allreduce_inplace
    auto_allreduce_inplace(buf, transport, op, cache)


def _auto_into(x, out, transport, op="sum", cache=None):
    from ringlab.bench.tuner import auto_allreduce_into
    auto_allreduce_into(x, out, transport, op, cache)


_auto.into = _auto_into   # out of place without copying the input first, when the pick has such a form


def register():
    """Make ``allreduce(x, algo="auto")`` pick a host algorithm by size and N (bench/tuner.py)."""
    from ringlab.api import register_allreduce
    register_allreduce("auto", _auto)
