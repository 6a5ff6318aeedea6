"""The house rules of cos_core, read from the source with `ast` (nothing is imported): no import circles, data flows
one way between the packages (docs/architecture.md), at most eight loose modules at the top, argparse only in the
CLI, diffusers only in capture and organism, streamlit nowhere, and only `capture/hooks.py` patches a pipeline's
`scheduler.step` or a transformer's `cache_context` (the primitive itself is tested at the end)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "cos_core"
HOOKS = PACKAGE / "capture" / "hooks.py"
MAX_LOOSE_MODULES = 8
# package (or top-level module) -> the other cos_core packages it may import; `cos_core` itself (__version__) is free
ALLOWED = {
    "tasks": set(),
    "organism": {"tasks"},
    "archive": set(),
    "capture": {"archive", "tasks", "organism"},
    "analysis": {"archive", "tasks"},
    "experiments": {"archive", "capture", "analysis", "tasks", "organism"},
    "frames": {"archive"},
    "plots": {"frames"},
    "cli": {"archive", "capture", "analysis", "experiments", "tasks", "organism", "frames", "plots"},
}
PATCHED = ("step", "cache_context")


def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of cos_core (packages by their __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The cos_core modules `name` imports anywhere in its file (module level, inside functions, under TYPE_CHECKING):
    `from pkg import sub` counts as importing the module `pkg.sub`, `from mod import obj` as importing `mod`."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = name if path.name == "__init__.py" else name.rpartition(".")[0]
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.update(f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names)
    return {m for m in out if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    known = module_files()
    return {name: imported(name, path, known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path [a, b, ..., a], or None (depth-first search, colouring nodes)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles_anywhere_in_cos_core():
    graph = import_graph()
    assert len(graph) > 50 and "cos_core.archive.reader" in graph["cos_core.archive"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_data_flows_one_way_between_the_packages():
    graph = import_graph()
    assert set(ALLOWED) == {layer(m) for m in graph} - {""}, "every package needs a row in ALLOWED (and the doc)"
    wrong = [f"{m} imports {d}" for m, deps in sorted(graph.items()) for d in sorted(deps)
             if layer(d) not in ({layer(m), ""} | ALLOWED.get(layer(m), set()))]
    assert not wrong, "\n".join(wrong)


def test_at_most_eight_loose_modules_at_the_top():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(loose) <= MAX_LOOSE_MODULES, loose


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module.split(".")[0])
    return out


def test_argparse_is_imported_only_by_the_cli():
    cli = PACKAGE / "cli"
    users = sorted(str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py") if "argparse" in imports_of(p))
    assert users and all(Path(u).is_relative_to(cli.relative_to(REPO)) for u in users), users


def test_only_capture_and_organism_import_diffusers_and_nothing_imports_streamlit():
    users = {lib: sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if lib in imports_of(p))
             for lib in ("diffusers", "streamlit")}
    assert users["diffusers"] and all(u.split("/")[0] in ("capture", "organism") for u in users["diffusers"]), users
    assert not users["streamlit"], users


def test_every_module_says_what_it_owns_in_a_docstring():
    missing = [str(p.relative_to(REPO)) for p in PACKAGE.rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert not missing, missing


# ---- one patch primitive ----------------------------------------------------------------------------------------
def patches(source: str, name: str = "<string>") -> list[str]:
    """Places that monkeypatch: `setattr`/`delattr` calls, and assigning or deleting `cache_context` or a scheduler's
    `step` (an attribute `step` of anything whose name mentions a scheduler)."""
    out = []
    for node in ast.walk(ast.parse(source, name)):
        where = f"{name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            out.append(f"{where} calls {node.func.id}()")
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
            [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
        for target in targets:
            if not isinstance(target, ast.Attribute) or target.attr not in PATCHED:
                continue
            owner = ast.unparse(target.value)
            if target.attr == "cache_context" or "scheduler" in owner.lower():
                out.append(f"{where} {'deletes' if isinstance(node, ast.Delete) else 'assigns'} {owner}.{target.attr}")
    return out


def test_the_patch_scanner_finds_what_it_looks_for():
    planted = """
scheduler.step = wrapper
self.pipe.scheduler.step = wrapper
del scheduler.step
transformer.cache_context = mine
setattr(module, "cache_context", mine)
delattr(scheduler, name)
self.s.step = i + 1
with patched(scheduler, "step", wrap):
    pass
"""
    found = patches(planted)
    assert len(found) == 6, found
    assert not any(":8 " in f or ":9 " in f for f in found), found


def test_only_the_hooks_primitive_patches_scheduler_step_or_cache_context():
    assert patches(HOOKS.read_text()), "the scanner should see the primitive itself"
    found = [hit for p in sorted(PACKAGE.rglob("*.py")) if p != HOOKS
             for hit in patches(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert not found, "\n".join(found)


# ---- the primitive itself -----------------------------------------------------------------------------------------
class Scheduler:
    def step(self, x):
        return x + 1


def test_patched_restores_a_class_attribute_seen_through_the_instance():
    from cos_core.capture.hooks import patched

    s = Scheduler()
    with patched(s, "step", lambda original: lambda x: original(x) * 10):
        assert s.step(1) == 20 and "step" in vars(s)
    assert "step" not in vars(s) and s.step.__func__ is Scheduler.step


def test_patched_restores_an_instance_attribute_someone_else_had_set_and_nests():
    from cos_core.capture.hooks import patched

    s = Scheduler()
    theirs = s.step = lambda x: x - 1  # another tool's wrapper
    with patched(s, "step", lambda original: lambda x: original(x) * 10):
        with patched(s, "step", lambda original: lambda x: original(x) + 100):
            assert s.step(5) == 140
        assert s.step(5) == 40
    assert vars(s)["step"] is theirs


def test_patched_restores_when_the_block_raises():
    from cos_core.capture.hooks import patched

    s = Scheduler()
    with pytest.raises(RuntimeError):
        with patched(s, "step", lambda original: None):
            raise RuntimeError("boom")
    assert "step" not in vars(s)


def test_the_branch_tracker_follows_cache_context_and_cleans_up():
    import contextlib

    from cos_core.capture.hooks import BranchTracker

    class Transformer:
        @contextlib.contextmanager
        def cache_context(self, name):
            yield

    t, tracker = Transformer(), BranchTracker(default="cond")
    with tracker.track(t):
        with t.cache_context("uncond"):
            assert tracker.name == "uncond"
        assert tracker.name == "cond"
    assert "cache_context" not in vars(t)
