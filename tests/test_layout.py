"""The code's shape: no import cycles between the package's modules, no module past ~400 lines.

Imports are read from the source (every ``import``/``from ... import``, at module level or
inside a function, where the lazy ones are), except those under ``if TYPE_CHECKING:``, which
never run. The folders map to packages as pyproject.toml maps them (``streams/`` is
``ocl.streams``, ``kernels/`` is ``ocl.kernels``, ``configs/`` is ``ocl.configs``).
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"ocl": "ocl", "streams": "ocl.streams", "kernels": "ocl.kernels", "configs": "ocl.configs"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> file."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:``."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules that module ``name`` imports."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .reference import x
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ocl.streams.cache.extract_features -> ocl.streams.cache
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_cycles():
    mods = modules()
    graph = {name: imports(name, path, set(mods)) for name, path in mods.items()}
    # a package's __init__ that re-exports its own submodules is not a cycle with them
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".") and not name.startswith(t + ".")}
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_check_sees_lazy_imports(tmp_path):
    """A function-level import counts (that is how compare and workers used to import each other)."""
    (tmp_path / "a.py").write_text("def f():\n    from ocl import b\n")
    assert imports("ocl.a", tmp_path / "a.py", {"ocl.a", "ocl.b"}) == {"ocl.b"}
    (tmp_path / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ocl import b\n")
    assert imports("ocl.c", tmp_path / "c.py", {"ocl.c", "ocl.b"}) == set()


def test_no_module_is_longer_than_about_400_lines():
    long = {str(path.relative_to(ROOT)): n for path in modules().values()
            if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split them): {long}"


def test_the_design_layout_names_every_module():
    """docs/DESIGN.md's closing "Layout" section lists every module of ocl/, streams/ and kernels/."""
    text = (ROOT / "docs" / "DESIGN.md").read_text()
    layout = text[text.index("\n## Layout"):]
    layout = layout[: layout.index("```", layout.index("```") + 3)]
    stems = {p.stem for folder in ("ocl", "ocl/learners", "ocl/learners/transformer", "ocl/learners/pooled", "streams",
                                                 "kernels")
             for p in (ROOT / folder).glob("*.py") if p.stem != "__init__"}
    missing = sorted(s for s in stems if s not in layout)
    assert not missing, f"docs/DESIGN.md's Layout section does not mention: {missing}"
