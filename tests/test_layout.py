"""The house's shape: only ``ringlab`` is installed top-level, and imports run downhill (no cycles).

Rooms, lowest first: kernels (all device code) may use the core's base modules only; the core never
imports the GPU executors except from the api layer; nothing in the library imports teach/ or bench/
(they sit above it); the package face (``ringlab/__init__``) may import anything.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# repo folder -> installed package (setup.py's package_dir)
PACKAGES = {"collectives": "ringlab", "kernels": "ringlab.kernels"}
API_LAYER = {"ringlab.api", "ringlab.fp8", "ringlab.work", "ringlab.algorithms", "ringlab.hierarchical"}
# torch clients above the api (they import torch; nothing in the library imports them)
TORCH_LAYER = {"ringlab.ddp_hooks", "ringlab.torch_backend"}


def _modules():
    mods = {}
    for folder, pkg in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg] + parts)] = path
    return mods


def _imports(path, modules):
    """Every ringlab module ``path`` imports, at any depth of the file (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from ringlab import settings`` imports the module ringlab.settings, not the package face
            subs = [f"{node.module}.{a.name}" for a in node.names]
            names = [s for s in subs if s in modules] or [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
        found |= {n for n in names if n in modules}
    return found


def _room(mod):
    parts = mod.split(".")
    if len(parts) > 2 and parts[1] in ("gpu", "teach", "bench", "kernels"):
        return parts[1]
    if parts[-1] in ("gpu", "teach", "bench", "kernels"):
        return parts[-1]
    if mod in TORCH_LAYER:
        return "torch"
    return "api" if mod in API_LAYER else ("face" if mod == "ringlab" else "core")


def test_no_import_cycles_and_imports_run_downhill():
    modules = _modules()
    graph = {m: _imports(p, modules) - {m} for m, p in modules.items()}
    # A package importing its own submodules (``from ringlab.bench import auto``) is not an edge back.
    allowed_below = {"kernels": {"kernels", "core"}, "core": {"core", "kernels"},
                     "gpu": {"gpu", "core", "kernels"}, "api": {"api", "core", "gpu", "kernels"},
                     "torch": {"torch", "api", "core", "gpu", "kernels"}, "teach": None, "bench": None, "face": None}
    wrong = []
    for m, deps in graph.items():
        ok = allowed_below[_room(m)]
        for d in deps:
            if ok is not None and _room(d) not in ok and not d.startswith(m + "."):
                wrong.append(f"{m} ({_room(m)}) imports {d} ({_room(d)})")
    assert not wrong, "uphill imports:\n" + "\n".join(sorted(wrong))
    # cycles: depth-first search over module edges (package __init__ -> own submodule edges excluded)
    edges = {m: {d for d in deps if not d.startswith(m + ".") and not m.startswith(d + ".")} for m, deps in graph.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in edges[m]:
            if state.get(d) == 1:
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2
    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_rooms_exist_and_every_module_is_reachable_as_ringlab():
    modules = _modules()
    for room in ("ringlab.gpu.ipc", "ringlab.teach.walkthrough", "ringlab.bench.harness", "ringlab.kernels.cuda_reduce",
                 "ringlab.settings", "ringlab.schedule"):
        assert room in modules, room


@pytest.mark.slow
def test_installed_distribution_has_only_ringlab_top_level(tmp_path):
    """Build what an install copies (setup.py's build_py) and list its top-level names: ``ringlab`` alone."""
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    names = [str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.py")]
    assert {n.split("/")[0] for n in names} == {"ringlab"}, sorted(names)[:20]
    for sub in ("ringlab/gpu/ipc.py", "ringlab/kernels/fp8.py", "ringlab/bench/harness.py", "ringlab/teach/walkthrough.py",
                "ringlab/settings.py", "ringlab/__init__.py"):
        assert sub in names, sub
