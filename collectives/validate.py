"""Cross-rank agreement before a collective: one tiny, bounded exchange instead of a hang."""
# Every rank contributes a fingerprint of its call (collective, count, dtype, op, algorithm,
# in-place-ness, issuing thread) and whether its own argument checks failed: the same number of
# integers for every collective, so even a call of a different collective pairs up cleanly. If any
# rank failed or any field differs, every rank raises the same InvalidCollectiveCall. docs/failure.md
# lists what this cannot catch. Switches: ``validate=False`` on a call, or RINGLAB_VALIDATE=0.
# The exchange is an Iallgather; on two ranks it is one persistent Irecv/Isend pair on AGREE_TAG
# (half the latency of MPICH's Iallgather, and no request to build per call: docs/results.md).

import atexit
import struct
import threading
import zlib

import numpy as np
from mpi4py import MPI

from ringlab import settings
from ringlab.settings import parse_transport
from ringlab.commstate import comm_state
from ringlab.arrays import as_array, is_device_array
from ringlab.errors import DEFAULT_TIMEOUT_S, CollectiveMismatch, resolve_timeout
from ringlab.ops import dtype_label
from ringlab.transport import env_unset, wait_all

__all__ = ["InvalidCollectiveCall", "checked_call", "agree_checked", "environment_checked", "validation_enabled",
           "issuing_thread", "issued_by", "FIELDS", "UNKNOWN", "prepare_out", "check_transport"]

FIELDS = ("collective", "count", "dtype", "op", "algo", "inplace")
# What every rank sends: FIELDS, the issuing thread's name and its call number on this communicator,
# "my local checks failed" -- 9 int64 for every collective.
_EXCHANGED = len(FIELDS) + 3
UNKNOWN = "?"   # a field a rank could not compute because its own argument was rejected
AGREE_TAG = 30007   # the two-rank exchange's tag (the rings use 7 and up; MPI guarantees tags to 32767)


class InvalidCollectiveCall(CollectiveMismatch, TypeError):
    """Bad arguments on some rank, or arguments that differ across ranks (raised on every rank)."""


_environment_checked = set()
_UNSET = object()


class _Issuer(threading.local):
    name = None           # a class default: reading it on a thread that never set it raises nothing


_issuer = _Issuer()
_codes = {}


def validation_enabled():
    """False when RINGLAB_VALIDATE=0 (skip the cross-rank check everywhere, e.g. in benchmarks)."""
    return True if env_unset("RINGLAB_VALIDATE") else settings.get("RINGLAB_VALIDATE")


def issuing_thread():
    """The name of the thread that issued the current call (an async call's caller, not the progress thread)."""
    return _issuer.name or threading.current_thread().name


class issued_by:
    """``with issued_by(name):`` calls made here count as issued by thread ``name`` (work.py's progress thread)."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.previous, _issuer.name = _issuer.name, self.name

    def __exit__(self, *exc):
        _issuer.name = self.previous


def _code(value):
    if isinstance(value, (bool, int, np.integer)):
        return int(value)
    try:
        code = _codes.get(value)
    except TypeError:          # unhashable: its text's hash, so the call still reaches the exchange
        return zlib.crc32(str(value).encode())
    if code is None:
        code = _codes[value] = zlib.crc32(str(value).encode())
        if len(_codes) > 4096:
            _codes.clear()
    return code


def _ranks(ranks):
    return ",".join(str(r) for r in ranks) if len(ranks) <= 8 else f"{ranks[0]}..{ranks[-1]} ({len(ranks)})"


def _group(values):
    """{value: [ranks]} in first-seen order."""
    by_value = {}
    for rank, value in enumerate(values):
        by_value.setdefault(value, []).append(rank)
    return by_value


def _describe(rows, errors):
    """Readable disagreements: the ranks' local errors (identical ones once), then each field whose
    known values (reprs) differ; a field a rank could not compute (UNKNOWN) is left out."""
    parts = [f"rank{'s' if len(rs) > 1 else ''} {_ranks(rs)}: {err}"
             for err, rs in _group(errors).items() if err is not None]
    for i, field in enumerate(FIELDS):
        by_value = _group(row[i] if row[i] != repr(UNKNOWN) else None for row in rows)
        by_value.pop(None, None)
        if len(by_value) > 1:
            shown = "; ".join(f"{v} on rank{'s' if len(rs) > 1 else ''} {_ranks(rs)}" for v, rs in by_value.items())
            parts.append(f"{field} differs across ranks: {shown}")
    return parts


def _bounded_allgather(comm, mine, recv, timeout, what):
    """``comm.Iallgather(mine, recv)`` completed within ``timeout`` seconds or CollectiveTimeout;
    ``what`` names the collective whose argument check this is. On two ranks a fingerprint goes over the
    communicator's _Pair (every rank does the same, the size being the same everywhere)."""
    if comm.size == 2 and mine.size == _EXCHANGED:
        _pair_exchange(comm, mine, recv, timeout, what)
        return
    req = comm.Iallgather(mine, recv)
    if req.Test():
        return

    def describe():
        # A collective cannot tell which rank is missing: say what the likely causes are.
        return (f"rank {comm.rank}: not every rank reached the argument check of {what} (a rank died or stalled "
                "before it, skipped it, called another collective, or runs with validation off)", None)
    wait_all([req], timeout, describe)


class _Pair:
    """Two ranks' fingerprint exchange on ``comm``: one fixed buffer (``both``: rank r's row is r's
    fingerprint; ``view``: its bytes) and a persistent receive/send pair, started once per call
    (comm_state's "agree-pair")."""

    def __init__(self, comm):
        rank, peer = comm.rank, 1 - comm.rank
        self.view = memoryview(bytearray(2 * _ROW))
        self.both = np.frombuffer(self.view, dtype=np.int64).reshape(2, _EXCHANGED)
        self.mine, self.offset = self.both[rank], rank * _ROW
        self.requests = [comm.Recv_init([self.both[peer], MPI.BYTE], peer, AGREE_TAG),
                         comm.Send_init([self.mine, MPI.BYTE], peer, AGREE_TAG)]
        if not _pairs:
            atexit.register(_close_pairs)     # after mpi4py's own atexit: runs before MPI_Finalize
        _pairs.append(self)

    def close(self):
        """Free the requests (comm_state calls this when the communicator is freed)."""
        requests, self.requests = self.requests, []
        for req in requests:
            if req:
                req.Free()
        if self in _pairs:
            _pairs.remove(self)


_ROW = 8 * _EXCHANGED
_pairs = []


def _close_pairs():
    while _pairs:
        _pairs[-1].close()


def _pair_exchange(comm, mine, recv, timeout, what):
    state = comm_state(comm)
    pair = state.get("agree-pair")
    if pair is None:
        pair = state["agree-pair"] = _Pair(comm)
    pair.mine[...] = mine
    _pair_run(comm, pair, state, timeout, what)
    recv[...] = pair.both


def _pair_run(comm, pair, state, timeout, what):
    """Exchange the rows of ``pair.both`` within ``timeout`` seconds (_bounded_allgather's errors)."""
    requests = pair.requests
    _startall(requests)
    if _testall(requests):
        return

    def describe():
        return (f"rank {comm.rank}: not every rank reached the argument check of {what} (a rank died or stalled "
                "before it, skipped it, called another collective, or runs with validation off)", None)
    try:
        wait_all(requests, timeout, describe)
    except BaseException:
        state.pop("agree-pair", None)       # still active: never started again (freed once complete)
        if pair in _pairs:
            _pairs.remove(pair)
        for req in requests:
            try:
                req.Free()
            except Exception:  # noqa: BLE001 - an MPI that refuses to free an active request: leave it
                pass
        raise


_startall = MPI.Prequest.Startall
_testall = MPI.Request.Testall


def _bounded_allgather_text(comm, text, timeout, what):
    """Every rank's ``text`` (variable length), gathered with two bounded non-blocking collectives."""
    data = np.frombuffer(text.encode(), dtype=np.uint8)
    lengths = np.empty(comm.size, dtype=np.int64)
    _bounded_allgather(comm, np.array([data.size], dtype=np.int64), lengths, timeout, what)
    everyone = np.empty(int(lengths.sum()), dtype=np.uint8)
    offsets = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    req = comm.Iallgatherv([data, MPI.BYTE], [everyone, (lengths, offsets), MPI.BYTE])
    wait_all([req], timeout, lambda: (f"rank {comm.rank}: a rank left during the argument check of {what}", None))
    return [everyone[o:o + n].tobytes().decode() for o, n in zip(offsets, lengths)]


def prepare_out(a, out, shape, what):
    """The output array: allocated when ``out`` is None, else checked for place, dtype, shape and writability."""
    if out is None:
        if is_device_array(a):
            import cupy
            if cupy.cuda.get_current_stream().is_capturing():   # cudaMalloc would invalidate the capture
                raise ValueError(f"{what}: out=None allocates device memory, which a CUDA graph capture cannot "
                                 "record: pass a preallocated out= (or out=x, in place)")
            return cupy.empty(shape, dtype=a.dtype)
        return np.empty(shape, dtype=a.dtype)
    if type(out) is np.ndarray and type(a) is np.ndarray and out.dtype == a.dtype and out.shape == tuple(shape):
        flags = out.flags
        if flags.c_contiguous and flags.writeable:     # the common host case, checked in one go
            return out
    o = as_array(out)
    if is_device_array(o) != is_device_array(a):
        raise TypeError(f"{what}: out is a {'device' if is_device_array(o) else 'host'} array but the "
                        f"input is a {'device' if is_device_array(a) else 'host'} array")
    if o.dtype != a.dtype:
        raise TypeError(f"{what}: out has dtype {dtype_label(o.dtype)}, the input has {dtype_label(a.dtype)}")
    if tuple(o.shape) != tuple(shape):
        raise ValueError(f"{what}: out has shape {tuple(o.shape)}, expected {tuple(shape)}")
    if not o.flags.c_contiguous:
        raise ValueError(f"{what}: out must be C-contiguous (it is written in place)")
    if not is_device_array(o) and not o.flags.writeable:
        raise ValueError(f"{what}: out is read-only (flags.writeable is False); pass a writable array")
    return o


def check_transport(transport, a, what):
    """Reject an unknown ``transport=`` (settings.TRANSPORTS), or a device transport named for a host array."""
    if transport is None:
        return
    name, _ = parse_transport(transport)
    if name not in ("auto", "mpi") and not is_device_array(a):
        raise ValueError(f"{what}: transport {transport!r} applies to device (CuPy) arrays; host (NumPy) arrays "
                         "go over MPI (transport None, 'auto' or 'mpi')")


def _exchange_timeout(timeout):
    """Seconds for the exchange; a bad ``timeout`` (reported by the caller's checks) falls back to the default."""
    try:
        return resolve_timeout(timeout)
    except Exception:  # noqa: BLE001 - the same value is rejected in the local checks, on this rank only
        try:
            return resolve_timeout(None)
        except Exception:  # noqa: BLE001 - a bad $RINGLAB_TIMEOUT is reported by check_environment
            return DEFAULT_TIMEOUT_S


def checked_call(comm, validate, signature, local_checks, timeout=None, what=None, call=None):
    """Run ``local_checks()`` (returns the prepared output) and, if validating, agree across ranks.

    ``signature``: a tuple in the order of FIELDS, or a callable returning one, called after the checks
    (even failed ones), so converting the arguments can itself be a checked step; if it fails too, the
    fields are UNKNOWN and ``what`` names the collective. ``timeout`` (None: $RINGLAB_TIMEOUT) is checked
    here as well (its seconds are left in ``call.seconds`` when ``call`` is given). Without validation a
    local failure raises on the failing rank only.
    """
    result, error, seconds = None, None, _UNSET
    try:
        if comm.size not in _environment_checked:    # every RINGLAB_* value, once per process and N
            settings.check_environment(comm.size)
            _environment_checked.add(comm.size)
        seconds = resolve_timeout(timeout)
        result = local_checks()
    except Exception as exc:  # any local failure must reach the other ranks, or they would pair with our next call
        error = exc
    if callable(signature):
        try:
            signature = tuple(signature())
        except Exception:  # noqa: BLE001 - the argument could not even be read: its error is in ``error``
            signature = (what,) + (UNKNOWN,) * (len(FIELDS) - 1)
    if call is not None and error is None:
        call.seconds = seconds
    return _agree(comm, validate, signature, error, result, seconds, timeout)


def agree_checked(comm, validate, signature, seconds, state=None):
    """The agreement of a call whose local checks all passed (api's NumPy fast path): checked_call's
    exchange, result and errors, for ``signature`` (a tuple) and the resolved ``seconds``; ``state``:
    comm's comm_state when the caller has it."""
    _agree(comm, validate, signature, None, None, seconds, seconds, state)


def environment_checked(nranks):
    """True once checked_call has validated every RINGLAB_* value for ``nranks`` ranks in this process."""
    return nranks in _environment_checked


def _agree(comm, validate, signature, error, result, seconds, timeout, state=None):
    """checked_call after the local checks: count the call, exchange fingerprints, raise on any difference."""
    what = signature[0]
    thread = _issuer.name or threading.current_thread().name    # issuing_thread()
    state = comm_state(comm) if state is None else state
    seqs = state.get("calls-per-thread")
    if seqs is None:
        seqs = state["calls-per-thread"] = {}
    seq = seqs[thread] = seqs.get(thread, 0) + 1      # this thread's call number on comm: the call's identity
    size = comm.size
    if not validate or size == 1 or not validation_enabled():
        if error is not None:
            raise InvalidCollectiveCall(f"{what}: {_error_text(error)}") from error
        return result
    if seconds is _UNSET:
        seconds = _exchange_timeout(timeout)
    pair = state.get("agree-pair") if size == 2 else None
    if pair is not None:     # two ranks: the fingerprint is written into the exchange's buffer, compared as bytes
        view, off = pair.view, pair.offset
        view[off:off + _ROW] = _prefix(signature, thread) + _pack_tail(seq, error is not None)
        _pair_run(comm, pair, state, seconds, what)
        if error is None and view[:_ROW] == view[_ROW:]:
            return result
    else:
        mine = _fingerprint(signature, thread)
        mine[-2] = seq
        mine[-1] = error is not None
        everyone = np.empty((size, _EXCHANGED), dtype=np.int64)
        _bounded_allgather(comm, mine, everyone, seconds, what)
        if error is None and everyone.tobytes() == mine.tobytes() * size:   # nobody failed, all fields equal
            return result
    raise InvalidCollectiveCall(_agreed_message(comm, signature, f"{thread!r} call #{seq}", error, seconds)) from error


_pack_tail = struct.Struct("=qq").pack     # a fingerprint's last two int64: call number, failed


def _prefix(signature, thread):
    """The bytes of ``_fingerprint(signature, thread)`` without its last two slots (cached)."""
    try:
        prefix = _prefixes.get((signature, thread))
    except TypeError:          # unhashable: _fingerprint computes it
        return _fingerprint(signature, thread)[:-2].tobytes()
    if prefix is None:
        if len(_prefixes) > 4096:
            _prefixes.clear()
        prefix = _prefixes[(signature, thread)] = _fingerprint(signature, thread)[:-2].tobytes()
    return prefix


_prefixes = {}


def _fingerprint(signature, thread):
    """A fresh int64 array: the codes of ``signature`` and ``thread``, then two slots (call number, failed)."""
    key = (signature, thread)
    try:
        base = _fingerprints.get(key)
    except TypeError:          # an unhashable argument (a bad op=[...]): computed, not cached
        key = base = None
    if base is None:
        base = np.array([_code(v) for v in signature] + [_code(thread), 0, 0], dtype=np.int64)
        if key is not None:
            if len(_fingerprints) > 4096:
                _fingerprints.clear()
            _fingerprints[key] = base
    return base.copy()


_fingerprints = {}


def _agreed_message(comm, signature, thread, error, seconds):
    """The slow path, taken by every rank together: gather readable values, build one identical text."""
    mine_text = "\x1f".join([repr(v) for v in signature] + [thread, "" if error is None else _error_text(error)])
    rows, threads, errors = [], [], []
    for text in _bounded_allgather_text(comm, mine_text, seconds, signature[0]):
        *values, name, err = text.split("\x1f")
        rows.append(tuple(values))
        threads.append(name)
        errors.append(err or None)
    parts = _describe(rows, errors)
    names = sorted({row[0].strip("'") for row in rows})
    by_thread = _group(threads)
    if len(by_thread) > 1:
        shown = "; ".join(f"thread {t} on rank{'s' if len(rs) > 1 else ''} {_ranks(rs)}" for t, rs in by_thread.items())
        parts.append(f"different threads' calls paired up: {shown} (threads issue collectives on one communicator "
                     "in different orders on different ranks: issue them from one thread, or give each thread its "
                     "own communicator, e.g. comm.Dup())")
    inconsistent = len(names) > 1 or any(" differs across ranks: " in p or p.startswith("different threads'") for p in parts)
    if inconsistent:
        return f"{' / '.join(names)} called inconsistently: " + " | ".join(parts)
    if all(e is not None for e in errors) and len(set(errors)) == 1:
        return f"{names[0]}: {errors[0]}"        # the same bad call everywhere: said once, as a local error is
    return f"{names[0]}: " + " | ".join(parts)


def _error_text(error):
    """``TypeError: unsupported dtype ...``: the type tells a bad argument from a crash."""
    return f"{type(error).__name__}: {error}"
