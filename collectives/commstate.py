"""Per-communicator state that lives exactly as long as the communicator (an MPI attribute)."""
# Caches keyed by ``comm.py2f()`` go stale when a communicator is freed and MPI hands the same
# handle to a new one (bandwidth_vs_n's sub-communicators did exactly that); an attribute is
# deleted by MPI with its communicator, and our delete callback closes what it held.

from mpi4py import MPI

__all__ = ["comm_state"]

_keyval = None


def _release(comm, keyval, state):
    """MPI calls this when the communicator is freed (or at finalize): close what it held."""
    for value in list(state.values()):
        close = getattr(value, "close", None)
        if callable(close):
            close()
    state.clear()


def comm_state(comm):
    """A dict private to ``comm`` for cached executors, choices and tables."""
    global _keyval
    if _keyval is None:
        _keyval = MPI.Comm.Create_keyval(delete_fn=_release)
    state = comm.Get_attr(_keyval)
    if state is None:
        state = {}
        comm.Set_attr(_keyval, state)
    return state
