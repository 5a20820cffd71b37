"""Every ``from ringlab... import name`` in the repo (library, experiments, MPI and device workers) names something
that exists, and every module's ``__all__`` is defined: device-only scripts otherwise fail only on the GPU."""
import ast
import importlib
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIRS = ("collectives", "kernels", "experiments", "tests")


def _sources():
    for d in DIRS:
        for base, _, files in os.walk(os.path.join(ROOT, d)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(base, f)


def _ringlab_imports():
    found = {}
    for path in _sources():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ringlab"):
                for alias in node.names:
                    if alias.name != "*":
                        found.setdefault((node.module, alias.name), os.path.relpath(path, ROOT))
    return found


def _module(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:      # cupy, torch: device-only modules are checked on the device
        if exc.name and exc.name.split(".")[0] in ("cupy", "cupyx", "torch", "cuda"):
            return None
        raise


def test_every_imported_ringlab_name_exists():
    missing = []
    for (mod, name), where in sorted(_ringlab_imports().items()):
        m = _module(mod)
        if m is None:
            continue
        if not hasattr(m, name):
            try:                       # a submodule imported by name (from ringlab.gpu import ipc)
                _module(f"{mod}.{name}")  # None: it exists but needs torch / cupy (not installed here)
            except ModuleNotFoundError:
                missing.append(f"{where}: from {mod} import {name}")
    assert not missing, "names that do not exist:\n" + "\n".join(missing)


@pytest.mark.parametrize("pkg", ["ringlab", "ringlab.kernels", "ringlab.gpu", "ringlab.bench", "ringlab.teach"])
def test_every_all_name_is_defined(pkg):
    import pkgutil
    root = importlib.import_module(pkg)
    names = [pkg] + [f"{pkg}.{m.name}" for m in pkgutil.iter_modules(root.__path__) if not m.ispkg]
    undefined = []
    for name in names:
        m = _module(name)
        if m is None:
            continue
        undefined += [f"{name}.{a}" for a in getattr(m, "__all__", ()) if not hasattr(m, a)]
    assert not undefined, "in __all__ but not defined: " + ", ".join(undefined)


def test_no_module_uses_an_undefined_name():
    """pyflakes' undefined names over every source (device-only scripts fail on the GPU only, e.g. a module used
    under a name its import did not bind)."""
    pytest.importorskip("pyflakes", reason="pyflakes is in the test extras")
    from pyflakes import checker, messages
    found = []
    for path in _sources():
        with open(path, encoding="utf-8") as fh:
            tree = ast.parse(fh.read(), path)
        for m in checker.Checker(tree, filename=path).messages:
            if isinstance(m, (messages.UndefinedName, messages.UndefinedLocal, messages.UndefinedExport)):
                found.append(f"{os.path.relpath(path, ROOT)}:{m.lineno}: {m.message % m.message_args}")
    assert not found, "\n".join(found)
