"""Imports run one way: root scripts -> utils/, eval/ -> model/ -> config.py (+ settings.py).

Every import statement of the project's modules is read with `ast`, including those inside
functions (a function-level import is a dependency all the same, only a late one), and
checked against the layers; then the module graph is searched for cycles.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "utils", "eval")
# The bottom floor: config.py and the rules its dataclasses are checked with.
CONFIG_MODULES = ("config", "settings")


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    """module name -> file, for the packages and the root scripts/modules."""
    mods = {p.stem: p for p in root.glob("*.py")}
    for pkg in PACKAGES:
        for p in sorted((root / pkg).rglob("*.py")):
            parts = p.relative_to(root).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement of `path` names, at any depth of the file;
    for `from a.b import c` both `a.b` and `a.b.c` (c may be a submodule)."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing package
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - node.level + 1] + ([node.module] if node.module else [])
                base = ".".join(parts)
            else:
                base = node.module
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)
    return names


def project_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports (names outside the project dropped; an
    import of `a.b.c` also counts as one of package `a.b`, whose __init__ runs first)."""
    mods = project_modules(root)
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in imported_names(path, name):
            parts = imp.split(".")
            deps.update(".".join(parts[:i]) for i in range(1, len(parts) + 1) if ".".join(parts[:i]) in mods)
        deps.discard(name)
        graph[name] = deps
    return graph


def layer_violations(root: Path = ROOT) -> list[str]:
    out = []
    for mod, deps in sorted(project_imports(root).items()):
        top = mod.split(".")[0]
        if top == "model":
            banned = ("utils", "eval")
        elif top in CONFIG_MODULES:
            banned = PACKAGES
        else:
            continue
        out += [f"{mod} imports {d}" for d in sorted(deps) if d.split(".")[0] in banned]
    return out


def package_imports(root: Path = ROOT) -> dict[str, set[str]]:
    """The same graph with each package (model, utils, eval) as one node."""
    graph = {}
    for mod, deps in project_imports(root).items():
        graph.setdefault(mod.split(".")[0], set()).update(d.split(".")[0] for d in deps)
    for top, deps in graph.items():
        deps.discard(top)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The modules of each strongly connected component of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):  # the graph is a few dozen modules: recursion depth is no concern
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_scan_sees_imports_inside_functions(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "utils").mkdir()
    (tmp_path / "model" / "a.py").write_text("def f():\n    from utils.b import g\n    return g\n")
    (tmp_path / "utils" / "b.py").write_text("import model.a\n\ndef g():\n    pass\n")
    (tmp_path / "model" / "c.py").write_text("from . import a\nfrom .a import f\n")  # relative
    (tmp_path / "config.py").write_text("import utils\n")
    (tmp_path / "utils" / "__init__.py").write_text("")
    assert layer_violations(tmp_path) == ["config imports utils", "model.a imports utils",
                                          "model.a imports utils.b"]
    assert project_imports(tmp_path)["model.c"] == {"model.a"}
    assert cycles(project_imports(tmp_path)) == [["model.a", "utils.b"]]
    (tmp_path / "model" / "d.py").write_text("X = 1\n")
    (tmp_path / "utils" / "b.py").write_text("import model.d\n")  # no module cycle, a package one
    assert cycles(project_imports(tmp_path)) == []
    assert cycles(package_imports(tmp_path)) == [["model", "utils"]]


def test_model_and_config_import_nothing_above_them():
    assert layer_violations() == []


def test_no_import_cycles():
    assert cycles(project_imports()) == []


def test_no_cycle_between_packages():
    """utils/ and eval/ may import model/, never the other way; eval/ may import utils/."""
    assert cycles(package_imports()) == []
