"""settings.py: every RINGLAB_* variable read in one place, validated, documented in docs/settings.md."""
import pathlib
import re

import pytest

from ringlab import settings

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_docs_table_matches_the_settings():
    assert settings.settings_table() in (ROOT / "docs" / "settings.md").read_text()


def test_no_library_module_reads_ringlab_variables_itself():
    readers = []
    for folder in ("collectives", "kernels"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "settings.py":
                continue
            if re.search(r"environ(\.get)?[\[(]\s*[\"']RINGLAB_", path.read_text()):
                readers.append(str(path.relative_to(ROOT)))
    assert not readers, readers


@pytest.mark.parametrize("name,bad", [("RINGLAB_TIMEOUT", "-1"), ("RINGLAB_TIMEOUT", "nan"), ("RINGLAB_TIMEOUT", "soon"),
                                      ("RINGLAB_ABORT_ON_TIMEOUT", "maybe"), ("RINGLAB_VALIDATE", "2"),
                                      ("RINGLAB_IPC_SLICES", "0"), ("RINGLAB_TRANSPORT", "carrier-pigeon"),
                                      ("RINGLAB_CUDA_AWARE", "perhaps"), ("RINGLAB_FAULT", "rank=1"),
                                      ("RINGLAB_RANKS_PER_NODE", "x")])
def test_bad_values_name_the_variable_and_what_it_accepts(monkeypatch, name, bad):
    from ringlab import faults  # noqa: F401  (registers the fault-plan parser)
    monkeypatch.setenv(name, bad)
    with pytest.raises(settings.SettingError, match=rf"{name}=.*accepted: "):
        settings.get(name)
    with pytest.raises(settings.SettingError, match=name):
        settings.check_environment(4)


def test_good_values_and_defaults(monkeypatch):
    for name in settings.SETTINGS:
        monkeypatch.delenv(name, raising=False)
        assert settings.get(name) == settings.SETTINGS[name].default
    monkeypatch.setenv("RINGLAB_TIMEOUT", "none")
    assert settings.get("RINGLAB_TIMEOUT") is None
    monkeypatch.setenv("RINGLAB_TRANSPORT", "ipc:4")
    assert settings.get("RINGLAB_TRANSPORT") == "ipc:4"
    monkeypatch.setenv("RINGLAB_CUDA_AWARE", "auto")
    assert settings.get("RINGLAB_CUDA_AWARE") is None


def test_fault_plan_naming_a_missing_rank_is_an_error(monkeypatch):
    from ringlab import faults  # noqa: F401
    monkeypatch.setenv("RINGLAB_FAULT", "rank=7,step=1,action=raise")
    settings.check_environment(8)
    with pytest.raises(settings.SettingError, match="rank 7.*0..3"):
        settings.check_environment(4)


def test_unknown_ringlab_variable_warns(monkeypatch):
    monkeypatch.setenv("RINGLAB_TIMEOUTT", "5")
    with pytest.warns(UserWarning, match="RINGLAB_TIMEOUTT is not a ringlab setting"):
        settings.check_environment(2)
