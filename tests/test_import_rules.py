"""Import rules of the package (issue 12, "Import rules"; layers in DESIGN.md), read from the source
with `ast`: imports at module level and inside functions both count, relative imports are resolved.
Each test lists every violation it finds, not only the first."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = "modalmerge"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE

# The faces: the only modules that may import the package root.
FACES = {f"{PACKAGE}", f"{PACKAGE}.cli", f"{PACKAGE}.api", f"{PACKAGE}.__main__", f"{PACKAGE}.commands"}

# Known violations whose fix is in flight in files this test's author does not own; each entry names its
# owner. The lead empties these lists; a listed violation that no longer occurs fails the test too.
ALLOWED: dict[str, set[str]] = {
    "cycles": set(),
    "package_root": set(),
    "private_names": set(),
    "method_imports_method": set(),
    "layers": set(),
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(SRC.rglob("*.py"))}
PACKAGES = {name for name, p in MODULES.items() if p.name == "__init__.py"}
# Folders without __init__.py (namespace packages) are packages too.
PACKAGES |= {module_name(d / "x.py").rsplit(".", 1)[0] for d in SRC.rglob("*") if d.is_dir()} | {PACKAGE}
TREES: dict[str, ast.Module] = {name: ast.parse(p.read_text(), str(p)) for name, p in MODULES.items()}


def is_face(name: str) -> bool:
    return name in FACES or name.startswith(f"{PACKAGE}.commands.")


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module imported (a submodule when the imported name is one)
    name: str | None  # the name taken from target (`from target import name`), else None
    line: int
    type_only: bool = False  # under `if TYPE_CHECKING:`: for annotations, never run

    def where(self) -> str:
        return f"{self.source}:{self.line}"


def resolve(source: str, node: ast.ImportFrom) -> str:
    """The absolute module of `from <node.module> import ...` written in `source`."""
    if not node.level:
        return node.module or ""
    package = source if source in PACKAGES and MODULES.get(source, Path()).name == "__init__.py" else source.rsplit(".", 1)[0]
    base = package.split(".")
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def type_checking_lines(tree: ast.AST) -> set[int]:
    """The lines of `if TYPE_CHECKING:` blocks."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def defined_names(module: str) -> set[str]:
    """The names a module binds at its top level (a package's __init__: what `from pkg import x` finds)."""
    tree = TREES.get(module)
    out: set[str] = set()
    for node in tree.body if tree else ():
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in node.names}
        else:
            out |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return out


def is_submodule(package: str, name: str) -> bool:
    """`from package import name` takes a submodule: a .py file, or (a compiled extension, which has no
    source here) a name the package's __init__ does not define."""
    sub = f"{package}.{name}"
    if sub in MODULES or sub in PACKAGES:
        return True
    return package in PACKAGES and name not in defined_names(package)


def imports_of(source: str) -> list[Import]:
    out = []
    type_only = type_checking_lines(TREES[source])
    for node in ast.walk(TREES[source]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    out.append(Import(source, alias.name, None, node.lineno, node.lineno in type_only))
        elif isinstance(node, ast.ImportFrom):
            module = resolve(source, node)
            if module != PACKAGE and not module.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if is_submodule(module, alias.name):  # `from pkg import submodule`
                    out.append(Import(source, sub, None, node.lineno, node.lineno in type_only))
                else:
                    out.append(Import(source, module, alias.name, node.lineno, node.lineno in type_only))
    return out


IMPORTS: dict[str, list[Import]] = {name: imports_of(name) for name in MODULES}


def check(rule: str, found: list[str]) -> None:
    """Fail with every violation not in the rule's allow-list, and with every allowed one that is gone."""
    allowed = ALLOWED[rule]
    new = sorted(v for v in found if v not in allowed)
    gone = sorted(allowed - set(found))
    message = ""
    if new:
        message += f"{len(new)} violation(s) of rule {rule!r}:\n  " + "\n  ".join(new)
    if gone:
        message += f"\nallow-list entries of {rule!r} that no longer occur (remove them):\n  " + "\n  ".join(gone)
    assert not message, message


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components with more than one module, or a module importing itself."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def one_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A shortest cycle through the component's first module, for the failure message."""
    start = component[0]
    members = set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ())):
                if w == start:
                    return paths[v] + [start]
                if w in members and w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    return component


def graph() -> dict[str, set[str]]:
    """Who imports whom when the code runs: imports inside functions count, those only for annotations
    (`if TYPE_CHECKING:`) do not."""
    g: dict[str, set[str]] = {name: set() for name in MODULES}
    for imports in IMPORTS.values():
        for imp in imports:
            if imp.target in MODULES and imp.target != imp.source and not imp.type_only:
                g[imp.source].add(imp.target)
    return g


def test_no_import_cycles():
    g = graph()
    found = []
    for component in strongly_connected(g):
        cycle = one_cycle(g, component)
        lines = {}
        for a, b in zip(cycle, cycle[1:]):
            lines[a] = min(i.line for i in IMPORTS[a] if i.target == b and not i.type_only)
        path = " -> ".join(f"{m} (line {lines[m]})" if m in lines else m for m in cycle)
        found.append(f"cycle among {', '.join(component)}: {path}")
    check("cycles", found)


def test_nothing_below_the_faces_imports_the_package_root():
    found = [
        f"{imp.where()} imports {imp.name or PACKAGE!r} from the package root"
        for name, imports in IMPORTS.items() if not is_face(name)
        for imp in imports if imp.target == PACKAGE
    ]
    check("package_root", found)


def module_aliases(tree: ast.AST, source: str) -> dict[str, str]:
    """Names bound to a package module by the imports directly in `tree`'s scope (not nested functions)."""
    out = {}

    def scan(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                        out[alias.asname or alias.name.split(".")[0]] = alias.name if alias.asname else alias.name.split(".")[0]
            elif isinstance(child, ast.ImportFrom):
                module = resolve(source, child)
                for alias in child.names:
                    if f"{module}.{alias.name}" in MODULES or f"{module}.{alias.name}" in PACKAGES:
                        out[alias.asname or alias.name] = f"{module}.{alias.name}"
            scan(child)

    scan(tree)
    return out


def local_names(fn: ast.AST) -> set[str]:
    """Names a function binds itself (parameters, assignments), which shadow imported modules."""
    names = set()
    if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = fn.args
        names |= {x.arg for x in a.posonlyargs + a.args + a.kwonlyargs}
        names |= {x.arg for x in (a.vararg, a.kwarg) if x}
    for node in ast.walk(fn):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return names


def private_attributes(source: str) -> list[str]:
    """`module._name` where `module` is a package module bound by an import in an enclosing scope."""
    found = []

    def visit(node, aliases):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            aliases = {k: v for k, v in aliases.items() if k not in local_names(node)}
            aliases |= module_aliases(node, source)
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            chain = []
            inner = node
            while isinstance(inner, ast.Attribute):
                chain.append(inner.attr)
                inner = inner.value
            if isinstance(inner, ast.Name) and inner.id in aliases and node is not None:
                module = aliases[inner.id]
                for attr in reversed(chain):
                    if f"{module}.{attr}" in MODULES or f"{module}.{attr}" in PACKAGES:
                        module = f"{module}.{attr}"
                        continue
                    if attr.startswith("_") and not attr.startswith("__"):
                        found.append(f"{source}:{node.lineno} reads {module}.{attr}")
                    break
                return  # the inner attributes are the same chain
        for child in ast.iter_child_nodes(node):
            visit(child, aliases)

    tree = TREES[source]
    visit(tree, module_aliases(tree, source))
    return found


def test_no_private_name_crosses_modules():
    found = [
        f"{imp.where()} imports {imp.target}.{imp.name}"
        for imports in IMPORTS.values() for imp in imports
        if imp.name and imp.name.startswith("_") and not imp.name.startswith("__") and imp.target != imp.source
    ]
    found += [
        f"{imp.where()} imports the private module {imp.target}"
        for imports in IMPORTS.values() for imp in imports
        if any(p.startswith("_") and not p.startswith("__") for p in imp.target.split("."))
    ]
    for name in MODULES:
        found += private_attributes(name)
    check("private_names", sorted(set(found)))


def method_files() -> set[str]:
    """The modules that define (not import) the Method objects of `registry.METHODS`."""
    import importlib

    from modalmerge.methods.registry import METHODS

    registered = {id(m) for m in METHODS.values()}
    out = set()
    for name, tree in TREES.items():
        if not name.startswith(f"{PACKAGE}.methods."):
            continue
        assigned = {
            t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)
        }
        module = importlib.import_module(name)
        if any(id(getattr(module, n, None)) in registered for n in assigned):
            out.add(name)
    return out


def test_method_files_do_not_import_each_other():
    files = method_files()
    assert len(files) >= 10, f"found only {sorted(files)} as method files; has registry.METHODS moved?"
    found = sorted({
        f"{imp.where()} imports the method file {imp.target}"
        for name in files for imp in IMPORTS[name]
        if imp.target in files and imp.target != name
    })
    check("method_imports_method", found)


# DESIGN.md's layers, lowest first: a module imports only from its own layer or those below. errors, paths
# and units are leaves every layer shares; ops and checkpoint are the two bottom layers, side by side
# (checkpoint may use ops' bit packing; ops knows nothing of files, so it never imports checkpoint).
# The benchmarks run merges the way a user does, through the API, so bench is not held below the faces.
LEVEL = {"shared": 0, "checkpoint": 1, "ops": 1, "methods": 2, "engine": 3, "procedures": 4, "runtime": 5, "bench": 6,
         "faces": 7}
ENFORCED = {"shared", "checkpoint", "ops", "methods", "engine", "procedures", "runtime"}


def layer(name: str) -> str:
    if is_face(name):
        return "faces"
    top = name.split(".")[1] if "." in name else ""
    return top if top in LEVEL else "shared"


def test_imports_only_go_down_the_layers():
    found = []
    for name, imports in IMPORTS.items():
        here = layer(name)
        if here not in ENFORCED:
            continue
        for imp in imports:
            there = layer(imp.target)
            if LEVEL[there] > LEVEL[here] or (here == "ops" and there == "checkpoint"):
                what = f"{imp.target}.{imp.name}" if imp.name else imp.target
                found.append(f"{imp.where()} ({here}) imports {what} ({there})")
    check("layers", found)


@pytest.mark.parametrize("name", ["modalmerge.engine.plan", "modalmerge.methods.ties"])
def test_the_rules_see_the_modules(name):
    # A guard against a test that passes because it reads nothing.
    assert name in MODULES and IMPORTS[name]
