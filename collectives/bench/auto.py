"""``algo="auto"``: registered here so the core never imports the tuner (the tuner sits above it)."""

__all__ = ["register"]


def _auto(buf, transport, op="sum", cache=None):
    # Imported on first use, so ``python -m ringlab.bench.tuner`` does not find itself already imported.
    from ringlab.bench.tuner import auto_allreduce_inplace
    auto_allreduce_inplace(buf, transport, op, cache)


def register():
    """Make ``allreduce(x, algo="auto")`` pick a host algorithm by size and N (bench/tuner.py)."""
    from ringlab.api import register_allreduce
    register_allreduce("auto", _auto)
