"""The layering of DESIGN.md section 10, checked by walking every import statement in the
package (module level and inside functions alike), so a lazy import cannot hide a cycle:

    errors, dtypes, hashing, codec  ->  store, crdt  ->  methods  ->  families  ->  resolve  ->  sync  ->  cli

Inside the package, modules import each other without cycles (a cycle hides which module
depends on which, and breaks on import order), and a module imports no private name
(``_name``) from another module nor reaches one through an imported module
(``module._name``): what another module needs is public.

``crdt_merge_server/`` sits beside the package and uses its public API; ``crdt_merge`` never imports it,
nor fastapi.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "crdt_merge"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def source_of(node: ast.ImportFrom, path: Path, name: str) -> str:
    """The module a ``from ... import`` in ``path`` (the module ``name``) reads from,
    relative imports resolved."""
    if not node.level:
        return node.module or ""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    base = package.split(".")[: len(package.split(".")) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports: dotted names, relative imports resolved, and
    ``from pkg import name`` counted as ``pkg.name`` when that is a module of ours."""
    name = module_name(path)
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            source = source_of(node, path, name)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if is_module(sub) else source)
    return out


MODULES = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def ours(imported: set[str]) -> set[str]:
    return {m for m in imported if m == "crdt_merge" or m.startswith("crdt_merge.")}


def within(module: str, *layers: str) -> bool:
    return any(module == f"crdt_merge.{layer}" or module.startswith(f"crdt_merge.{layer}.")
               for layer in layers)


def in_layer(*layers: str) -> list[str]:
    return sorted(m for m in MODULES if within(m, *layers))


def test_the_walk_sees_the_package():
    assert {"crdt_merge.codec", "crdt_merge.store.local", "crdt_merge.crdt.ops"} <= set(MODULES)
    assert "crdt_merge.errors" in MODULES["crdt_merge.codec"]
    assert "crdt_merge.codec" in MODULES["crdt_merge.crdt.ops"]  # from crdt_merge import codec


@pytest.mark.parametrize("module", ["crdt_merge.errors", "crdt_merge.hashing", "crdt_merge.codec"])
def test_the_base_imports_nothing_of_ours_but_the_base(module):
    allowed = {"crdt_merge.errors", "crdt_merge.hashing", "crdt_merge.codec"}
    order = ["crdt_merge.errors", "crdt_merge.hashing", "crdt_merge.codec"]
    below = set(order[: order.index(module)])  # errors <- hashing <- codec, never upward
    assert ours(MODULES[module]) <= below & allowed, module


@pytest.mark.parametrize("module", in_layer("store", "crdt"))
def test_store_and_crdt_import_only_the_base(module):
    own = module.split(".")[1]
    allowed = {"crdt_merge.errors", "crdt_merge.hashing", "crdt_merge.codec", "crdt_merge.lazy",
               "crdt_merge.dtypes", "crdt_merge.testpoints"}
    bad = {m for m in ours(MODULES[module]) if m not in allowed and not within(m, own)}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", in_layer("methods"))
def test_methods_never_import_the_store_crdt_or_anything_above(module):
    bad = {m for m in ours(MODULES[module])
           if within(m, "store", "crdt", "resolve", "sync", "cli", "replica", "families")}
    assert not bad, f"{module} imports {sorted(bad)}"


@pytest.mark.parametrize("module", in_layer("families"))
def test_families_never_import_the_store_crdt_or_anything_above(module):
    bad = {m for m in ours(MODULES[module])
           if within(m, "store", "crdt", "resolve", "sync", "cli", "replica")}
    assert not bad, f"{module} imports {sorted(bad)}"


#: the order of DESIGN.md section 10; a layer imports no layer ranked after it (store and
#: crdt share a rank but do not import each other, see above). ``crdt_merge`` is the package
#: itself (``from crdt_merge import ENGINE``); ``replica`` is the public API over store + crdt.
RANKS = {"errors": 0, "lazy": 0, "dtypes": 0, "testpoints": 0, "hashing": 1, "codec": 2, "numeric": 2, "": 2, "store": 3, "crdt": 3,
         "methods": 4, "families": 5, "recipe": 5, "interop": 6, "replica": 6, "maintenance": 6, "formats": 6, "transfer": 6, "resolve": 7, "sync": 8, "cli": 9,
         "demo": 10, "__main__": 10}


def layer(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


@pytest.mark.parametrize("module", sorted(m for m in MODULES if layer(m) in RANKS))
def test_no_module_imports_a_layer_above_its_own(module):
    rank = RANKS[layer(module)]
    above = {m for m in ours(MODULES[module])
             if layer(m) != layer(module) and RANKS.get(layer(m), 99) > rank}
    assert not above, f"{module} imports {sorted(above)} (layer order: {RANKS})"


#: known violations, each reported to the lead; strict, so fixing one turns its entry red
KNOWN_SERVER_IMPORTS: dict[str, str] = {}


@pytest.mark.parametrize("module", [
    pytest.param(m, marks=pytest.mark.xfail(strict=True, reason=KNOWN_SERVER_IMPORTS[m]))
    if m in KNOWN_SERVER_IMPORTS else m for m in sorted(MODULES)])
def test_the_package_never_imports_the_server_or_fastapi(module):
    bad = {m for m in MODULES[module]
           if m.split(".")[0] in ("crdt_merge_server", "fastapi", "uvicorn", "starlette")}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_dtypes_imports_nothing_of_ours():
    assert not ours(MODULES["crdt_merge.dtypes"])


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
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
            if w not in graph:
                continue
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
    return sorted(out)


def test_the_cycle_finder_finds_cycles():
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert import_cycles({"a": {"b"}, "b": set(), "c": {"c"}}) == [["c"]]
    assert import_cycles({"a": {"b"}, "b": {"x"}}) == []


#: known cycles, each reported to the lead; strict, so breaking one turns its entry red
KNOWN_CYCLES: dict[tuple[str, ...], str] = {}


def _package_cycles() -> list[tuple[str, ...]]:
    graph = {m: ours(imported) - {m} for m, imported in MODULES.items()}
    return [tuple(c) for c in import_cycles(graph)]


def test_every_known_cycle_is_still_there():
    """An entry of KNOWN_CYCLES whose cycle is gone must go too."""
    assert not [c for c in KNOWN_CYCLES if c not in _package_cycles()]


def test_no_import_cycle_inside_the_package():
    cycles = [c for c in _package_cycles() if c not in KNOWN_CYCLES]
    assert not cycles, f"import cycles: {cycles}"


def private_uses(path: Path, name: str | None = None) -> set[str]:
    """``module:name`` for every private name ``path`` (the module ``name``) imports from
    another of our modules (``from m import _x``) or reaches through one (``import m as
    alias`` ... ``alias._x``)."""
    name = name or module_name(path)
    aliases: dict[str, str] = {}
    out: set[str] = set()

    def private(attr: str) -> bool:
        return attr.startswith("_") and not (attr.startswith("__") and attr.endswith("__"))

    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("crdt_merge") and alias.asname:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            source = source_of(node, path, name)
            if not (source == "crdt_merge" or source.startswith("crdt_merge.")):
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if is_module(sub):
                    aliases[alias.asname or alias.name] = sub
                elif private(alias.name) and source != name:
                    out.add(f"{source}:{alias.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases and private(node.attr)):
            out.add(f"{aliases[node.value.id]}:{node.attr}")
    return out


def test_the_private_name_walk_sees_both_forms(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from crdt_merge.crdt.ops import _HIDDEN, PUBLIC\n"
                     "from crdt_merge.crdt import ops as opmod\n"
                     "import crdt_merge.store.objects as objects\n"
                     "x = opmod._OTHER\ny = opmod.PUBLIC\nz = objects.__name__\n"
                     "w = objects._tmp\n")
    assert private_uses(probe, "crdt_merge.resolve.probe") == {
        "crdt_merge.crdt.ops:_HIDDEN", "crdt_merge.crdt.ops:_OTHER",
        "crdt_merge.store.objects:_tmp"}


#: known private uses across modules, each reported to the lead; strict, so fixing one
#: turns its entry red
KNOWN_PRIVATE: dict[str, str] = {}


@pytest.mark.parametrize("path", [
    pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_PRIVATE[module_name(p)]))
    if module_name(p) in KNOWN_PRIVATE else p
    for p in sorted(PACKAGE.rglob("*.py"))], ids=lambda p: module_name(p))
def test_no_private_name_from_another_module(path):
    assert not private_uses(path), f"{module_name(path)} uses {sorted(private_uses(path))}"
