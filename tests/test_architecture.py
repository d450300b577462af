"""The shape of the package: import rules (docs/DESIGN.md) checked on the source, and torch kept out
of the search path."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lookalike

PKG = Path(lookalike.__file__).parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Package modules imported anywhere in ``path`` (module level or inside functions)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("lookalike"):
                continue
            if node.module is None or target in _modules():
                # `from . import x` / `from .pkg import x`: x may be a module
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.add(sub if sub in _modules() else target)
            else:
                out.add(target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("lookalike"))
    out.discard(me)
    return {m for m in out if m in _modules()}


_CACHE: dict = {}


def _modules() -> set[str]:
    if "mods" not in _CACHE:
        _CACHE["mods"] = {_module_name(p) for p in PKG.rglob("*.py")}
    return _CACHE["mods"]


def _graph() -> dict[str, set[str]]:
    graph = {}
    for p in PKG.rglob("*.py"):
        me = _module_name(p)
        # a package's __init__ re-exporting its own modules is not a dependency of those modules
        graph[me] = {m for m in _imports(p) if not (p.name == "__init__.py" and m.startswith(me + "."))}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if m == "lookalike":  # the package root only re-exports
                continue
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles_between_modules():
    graph = _graph()
    assert "lookalike.collection" in graph and "lookalike.api.searching" in graph
    assert "lookalike.postprocess" in graph["lookalike.collection"]  # imports inside functions count
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_no_stage_imports_the_package_root_or_the_cli():
    for mod, deps in _graph().items():
        if mod in ("lookalike", "lookalike.cli"):
            continue
        assert "lookalike" not in deps, f"{mod} imports the package root (import from the module that owns the name)"
        assert "lookalike.cli" not in deps, f"{mod} imports the cli"
        if not mod.startswith("lookalike.api"):
            assert not any(d.startswith("lookalike.api") for d in deps), f"{mod} imports the api"


def test_the_cli_uses_only_the_api():
    allowed = {"lookalike.api", "lookalike.errors", "lookalike._version", "lookalike.extract", "lookalike.index",
               "lookalike.postprocess", "lookalike.formats", "lookalike.codec"}
    # extract/index/postprocess/formats/codec: only for option choices and defaults (names, not work)
    deps = _graph()["lookalike.cli"]
    assert deps <= allowed, deps - allowed
    src = (PKG / "cli.py").read_text(encoding="utf-8")
    for work in ("Extractor(", "Collection", "load_collection", "save_collection", "read_store", "write_store",
                 "Codec.load", "inspect_images", "make_sample"):
        assert work not in src, f"cli.py does work itself: {work}"


def test_no_private_names_imported_across_modules():
    offenders = []
    for p in PKG.rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                for a in node.names:
                    if a.name.startswith("_") and not a.name.startswith("__") and a.name != "_version":
                        offenders.append(f"{_module_name(p)}: from {'.' * node.level}{node.module} import {a.name}")
    # the api package re-exports one helper for the benchmarks
    offenders = [o for o in offenders if o != "lookalike.api: from .queries import path_key"]
    assert not offenders, offenders


@pytest.mark.parametrize("code", [
    "import lookalike.index, lookalike.postprocess, lookalike.formats, lookalike.metrics, lookalike.collection",
    "import lookalike.cli",
    # a search with query features: the whole command, end to end
    "from lookalike.api import search; search(IDX, query_features=QF, output=OUT)",
])
def test_the_search_path_does_not_import_torch(code, tmp_path):
    import numpy as np

    from lookalike.index import build_index
    from lookalike.store import write_store

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    attrs = {"model_id": "m", "fingerprint": "f", "config": '{"model": "lite0"}'}
    write_store(tmp_path / "g.h5", [f"g{i}.jpg" for i in range(20)], x, attrs)
    write_store(tmp_path / "q.h5", [f"q{i}.jpg" for i in range(3)], x[:3], attrs)
    build_index(tmp_path / "g.h5", tmp_path / "idx")
    prelude = f"IDX, QF, OUT = {str(tmp_path / 'idx')!r}, {str(tmp_path / 'q.h5')!r}, {str(tmp_path / 'r.csv')!r}\n"
    check = "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')"
    r = subprocess.run([sys.executable, "-c", prelude + code + check], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
