"""Every ``RINGLAB_*`` environment setting, read here alone, lazily, and validated."""
# ``get(name)`` parses the variable at each call (so tests and launchers may change it), and a bad
# value raises ``SettingError`` naming the variable and what it accepts. ``check_environment()`` runs
# before a collective's argument agreement: every set ``RINGLAB_*`` variable is parsed, so a typo fails
# at the first call on every rank instead of when a timeout finally fires. The table is ``SETTINGS``
# (docs/settings.md is generated from it by ``settings_table()``).

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["SETTINGS", "Setting", "SettingError", "get", "register", "check_environment", "settings_table", "parse_bool",
           "TRANSPORTS", "parse_transport"]


class SettingError(ValueError):
    """A ``RINGLAB_*`` variable holds a value the setting does not accept."""


@dataclass(frozen=True)
class Setting:
    name: str
    default: Any
    parse: Callable[[str], Any]     # raw text -> value; raises ValueError with what it accepts
    accepts: str
    doc: str


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(raw):
    raw = raw.strip().lower()
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError("expected 1/0 (or true/false, yes/no, on/off)")


def _seconds_or_none(raw):
    """Seconds > 0; 0, 'none' and 'inf' mean no limit. Negative numbers and NaN are errors."""
    raw = raw.strip().lower()
    if raw in ("0", "none", "inf"):
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number of seconds > 0, or 0/none/inf for no limit") from None
    if math.isnan(value) or value < 0:
        raise ValueError("expected a number of seconds > 0, or 0/none/inf for no limit")
    return None if value == 0 or math.isinf(value) else value


def _positive_int(raw):
    try:
        value = int(raw.strip())
    except ValueError:
        raise ValueError("not an integer (expected a whole number >= 1)") from None
    if value < 1:
        raise ValueError("expected a whole number >= 1")
    return value


def _tristate(raw):
    raw = raw.strip().lower()
    if raw in ("", "auto"):
        return None
    return parse_bool(raw)


# The one transport vocabulary for device buffers (``transport=`` and $RINGLAB_TRANSPORT); "ipc:K" adds
# K pipeline slices per ring step.
TRANSPORTS = ("auto", "device", "ipc", "ipc-host", "ipc-shared", "mpi", "staged")


def parse_transport(text, default_slices=1):
    """'ipc:4' -> ('ipc', 4); 'staged' -> ('staged', default_slices). Unknown names raise ValueError."""
    name, _, slices = (text or "auto").strip().partition(":")
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; expected one of {', '.join(TRANSPORTS)} (ipc:K for K slices)")
    try:
        k = int(slices) if slices else default_slices
    except ValueError:
        raise ValueError(f"bad slice count in transport {text!r}") from None
    if k < 1:
        raise ValueError(f"slice count must be >= 1 in transport {text!r}")
    return name, k


def _transport(raw):
    parse_transport(raw)
    return raw.strip()


def _fault_syntax(raw):
    # faults.py registers the real parser (a FaultPlan) at import; this one only keeps the text.
    return raw


def _path(raw):
    if not raw.strip():
        raise ValueError("expected a file path")
    return os.path.expanduser(raw.strip())


SETTINGS = {s.name: s for s in [
    Setting("RINGLAB_TIMEOUT", 300.0, _seconds_or_none, "seconds > 0, or 0/none/inf",
            "bound on every blocking wait; a peer silent that long raises CollectiveTimeout"),
    Setting("RINGLAB_ABORT_ON_TIMEOUT", True, parse_bool, "1/0",
            "1: a timeout prints the error and aborts the job (exit 75); 0: raise CollectiveTimeout"),
    Setting("RINGLAB_VALIDATE", True, parse_bool, "1/0",
            "0 skips the cross-rank argument agreement on every call (benchmarks); same on every rank"),
    Setting("RINGLAB_FAULT", None, _fault_syntax, "rank=R,step=S,action=kill|stall|exit|raise[,phase=,seconds=,code=]",
            "fault injection for tests and experiments/fault_drill.py; R must be a rank of the job"),
    Setting("RINGLAB_RANKS_PER_NODE", None, _positive_int, "a whole number >= 1",
            "declared node size for the hierarchical algorithms (default: MPI's shared-memory split)"),
    Setting("RINGLAB_TUNING", None, _path, "a file path",
            "algo='auto' tuning file (default ~/.cache/ringlab/tuning.json; `python -m ringlab.bench.tuner`)"),
    Setting("RINGLAB_TRANSPORT", "auto", _transport, "auto, device, ipc[:K], ipc-host, ipc-shared, mpi, staged",
            "device-buffer transport (same vocabulary as transport=)"),
    Setting("RINGLAB_IPC_SLICES", 1, _positive_int, "a whole number >= 1",
            "pipeline slices per ring step of the CUDA IPC ring when transport= names none"),
    Setting("RINGLAB_CUDA_AWARE", None, _tristate, "1/0/auto",
            "force the CUDA-aware-MPI verdict (auto: the library's claim checked by a child-process probe)"),
    Setting("RINGLAB_IPC_TRACE", False, parse_bool, "1/0",
            "the IPC ring's leader prints its wait/ops time split per call"),
    Setting("RINGLAB_IPC_VECTOR", True, parse_bool, "1/0",
            "0: the IPC ring reduces with CuPy elementwise kernels instead of the 16-byte vector kernel"),
    Setting("RINGLAB_NUMBA_FAST_LAUNCH", True, parse_bool, "1/0",
            "0: launch numba kernels through numba's dispatcher instead of the lean launcher"),
    Setting("RINGLAB_FP8_HW", True, parse_bool, "1/0",
            "0: FP8 conversions in software instead of the Hopper cvt instructions"),
    Setting("RINGLAB_SLOW_TESTS", False, parse_bool, "1/0",
            "1 runs the test suite's opt-in slow property sweep (tests/test_properties.py)"),
]}


def register(setting):
    """Add a setting (for a room above the core that needs its own, e.g. a GPU executor)."""
    SETTINGS[setting.name] = setting


def get(name):
    """The parsed value of ``name`` ($name if set and non-empty, else its default)."""
    setting = SETTINGS[name]
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return setting.default
    key = (name, raw, setting.parse)
    if key not in _parsed:      # one parse per value: a stateful value (a fault plan) stays one object
        try:
            _parsed[key] = setting.parse(raw)
        except ValueError as exc:
            raise SettingError(f"{name}={raw!r} is not valid: {exc} (accepted: {setting.accepts})") from None
    return _parsed[key]


_parsed = {}


def check_environment(nranks=None):
    """Parse every set ``RINGLAB_*`` variable; a fault plan must name a rank < ``nranks``.

    Unknown ``RINGLAB_*`` names are warned about once (a typo would otherwise be silently ignored).
    """
    for name in sorted(k for k in os.environ if k.startswith("RINGLAB_")):
        if name not in SETTINGS:
            if name not in _warned:
                _warned.add(name)
                warnings.warn(f"{name} is not a ringlab setting (known: {', '.join(SETTINGS)}); ignored",
                              stacklevel=3)
            continue
        value = get(name)
        if name == "RINGLAB_FAULT" and value is not None and nranks is not None and not 0 <= value.rank < nranks:
            raise SettingError(f"RINGLAB_FAULT names rank {value.rank}, but the job has ranks 0..{nranks - 1}")


_warned = set()


def settings_table():
    """The settings as a Markdown table (name, default, accepted values, meaning)."""
    rows = ["| variable | default | accepted | meaning |", "| --- | --- | --- | --- |"]
    for s in SETTINGS.values():
        cells = [f"`{s.name}`", f"`{s.default!r}`", s.accepts, s.doc]
        rows.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(rows)
