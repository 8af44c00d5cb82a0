"""The package's layering, read from the source with `ast` (nothing is imported).

Layers, bottom to top: kernel < content < store < sources < fetch < node < web < ops < cli.
Every import counts: at module level, inside functions, under `if TYPE_CHECKING:`. A module
imports what an import statement names: `from p2pimg.a import b` imports the module `p2pimg.a.b`
when there is one, else `p2pimg.a` (b is a name in it). The package `__init__` that Python runs
before a submodule is not counted as imported by it (every module would import `p2pimg`).

Checked: (a) no module imports a module of a higher layer; (b) no modules import each other in
a cycle (TYPE_CHECKING imports included: there is no need to leave them out); (c) the content
layer, with everything it imports from p2pimg, uses no trio, httpx, h11, threads, sockets or
event loops; (d) the same for the fetch schedule (nor the clock: it is decided by its inputs);
(e) no module is over 600 lines. The checks are plain functions, and
the tests at the end feed them a made-up package, so that each is seen to fail.
"""

from __future__ import annotations

import ast
from collections.abc import Container, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[2] / "p2pimg"

LAYERS = ("kernel", "content", "store", "sources", "fetch", "node", "web", "ops", "cli")
KERNEL = ("errors", "tasks", "metrics")  # p2pimg/<name>.py
# Outside the layers, with why:
# - p2pimg/__init__.py is the package's face: it re-exports Cid, BlobMap, ImageRoot, TagRecord and
#   P2pimgError to library users, and Python runs it before any p2pimg module at all. As an
#   importer it is checked on its own (test_package_face_stays_at_the_bottom: kernel and content
#   only); as something imported (`from p2pimg import __version__`) it counts as content.
# - p2pimg/__main__.py is `python -m p2pimg`, the process entry point: it runs the CLI, so it sits
#   above every layer, and nothing may import it.
FACE_LAYER = "content"
ENTRY_LAYER = len(LAYERS)

MAX_LINES = 600
OVERSIZE_ALLOWED: frozenset[str] = frozenset()  # none: split a module that outgrows the limit

# No event loop, network, HTTP or threads in the content layer (sans-I/O but for key files).
CONTENT_FORBIDDEN = frozenset(
    {
        "trio",
        "anyio",
        "asyncio",
        "httpx",
        "httpcore",
        "h11",
        "threading",
        "concurrent",
        "multiprocessing",
        "socket",
        "ssl",
        "select",
        "selectors",
        "subprocess",
        "zeroconf",
        "urllib3",
        "boto3",
        "botocore",
    }
)
# The fetch schedule decides from its inputs alone: no I/O, no threads, no clock.
SCHEDULE = "p2pimg.fetch.schedule"
SCHEDULE_FORBIDDEN = frozenset({"trio", "httpx", "threading", "time"})


@dataclass(frozen=True)
class Import:
    target: str  # the module imported (for another package: its full dotted name)
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:`
    in_function: bool


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    lines: int
    imports: list[Import] = field(default_factory=list)


# -- reading a package ------------------------------------------------------------------------------


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement in `tree`, with (under TYPE_CHECKING, inside a function)."""

    def visit(
        node: ast.AST, type_checking: bool, in_function: bool
    ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, type_checking, in_function
            return
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                yield from visit(stmt, True, in_function)
            for stmt in node.orelse:
                yield from visit(stmt, type_checking, in_function)
            return
        inner = in_function or isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for child in ast.iter_child_nodes(node):
            yield from visit(child, type_checking, inner)

    yield from visit(tree, False, False)


def _targets(
    node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: Container[str]
) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package, one level up per extra dot
        parts = module.split(".") if is_package else module.split(".")[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    return list(
        dict.fromkeys(
            f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
        )
    )


def read_package(root: Path) -> dict[str, Module]:
    """Every module under the package directory `root`, with its imports."""
    modules: dict[str, Module] = {}
    texts: dict[str, str] = {}
    for path in sorted(root.rglob("*.py")):
        name, is_package = _module_name(path, root)
        texts[name] = path.read_text(encoding="utf-8")
        modules[name] = Module(name, path, is_package, len(texts[name].splitlines()))
    for module in modules.values():  # once all are known: `from a import b` needs to know if a.b is one
        tree = ast.parse(texts[module.name], filename=str(module.path))
        module.imports = [
            Import(target, node.lineno, type_checking, in_function)
            for node, type_checking, in_function in _import_nodes(tree)
            for target in _targets(node, module.name, module.is_package, modules)
        ]
    return modules


# -- the rules --------------------------------------------------------------------------------------


def layer_of(name: str, package: str = "p2pimg") -> int | None:
    """A module's layer (an index into LAYERS); None for a module of no layer."""
    if name == package:
        return LAYERS.index(FACE_LAYER)
    if name == f"{package}.__main__":
        return ENTRY_LAYER
    parts = name.split(".")
    if len(parts) == 2 and parts[1] in KERNEL:
        return 0
    if len(parts) >= 2 and parts[1] in LAYERS[1:]:
        return LAYERS.index(parts[1])
    return None


def _layer_name(index: int) -> str:
    return LAYERS[index] if index < len(LAYERS) else "entry point"


def internal(target: str, package: str) -> bool:
    return target == package or target.startswith(package + ".")


def unplaced_modules(modules: dict[str, Module], package: str = "p2pimg") -> list[str]:
    return sorted(name for name in modules if layer_of(name, package) is None)


def unknown_imports(modules: dict[str, Module], package: str = "p2pimg") -> list[str]:
    """Imports of package modules that do not exist."""
    return [
        f"{m.name}:{i.line} imports {i.target}, which is not a module of {package}"
        for m in modules.values()
        for i in m.imports
        if internal(i.target, package) and i.target not in modules
    ]


def upward_imports(modules: dict[str, Module], package: str = "p2pimg") -> list[str]:
    """Imports of a module of a higher layer, as readable lines (the package face excepted as an
    importer: see the comment at the top)."""
    found = []
    for module in modules.values():
        if module.name in (package, f"{package}.__main__"):
            continue
        here = layer_of(module.name, package)
        for imp in module.imports:
            there = layer_of(imp.target, package) if internal(imp.target, package) else None
            if here is not None and there is not None and there > here:
                where = (
                    " under TYPE_CHECKING"
                    if imp.type_checking
                    else " in a function"
                    if imp.in_function
                    else ""
                )
                found.append(
                    f"{module.name}:{imp.line} ({_layer_name(here)}) imports {imp.target} "
                    f"({_layer_name(there)}){where}"
                )
    return found


def import_cycles(modules: dict[str, Module], package: str = "p2pimg") -> list[list[str]]:
    """Groups of modules that import each other, directly or through others (Tarjan's strongly
    connected components, iteratively); a module importing itself counts too."""
    graph = {
        name: sorted({i.target for i in m.imports if i.target in modules}) for name, m in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, 0)]
        while work:
            node, child = work.pop()
            if child == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            if child < len(graph[node]):
                work.append((node, child + 1))
                nxt = graph[node][child]
                if nxt not in index:
                    work.append((nxt, 0))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1 or node in graph[node]:
                    cycles.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return cycles


def reached(modules: dict[str, Module], start: str) -> set[str]:
    """`start` and every package module it imports, directly or through others."""
    seen = {start}
    todo = [start]
    while todo:
        for imp in modules[todo.pop()].imports:
            if imp.target in modules and imp.target not in seen:
                seen.add(imp.target)
                todo.append(imp.target)
    return seen


def forbidden_imports(
    modules: dict[str, Module], starts: Iterable[str], forbidden: frozenset[str], package: str = "p2pimg"
) -> list[str]:
    """Imports of a forbidden top-level module by `starts` or any package module they reach."""
    found = []
    for name in sorted(set().union(*(reached(modules, s) for s in starts))):
        for imp in modules[name].imports:
            if not internal(imp.target, package) and imp.target.split(".")[0] in forbidden:
                found.append(f"{name}:{imp.line} imports {imp.target}")
    return found


def oversize(
    modules: dict[str, Module], repo: Path, allowed: frozenset[str] = OVERSIZE_ALLOWED, limit: int = MAX_LINES
) -> list[str]:
    return sorted(
        f"{m.path.relative_to(repo).as_posix()}: {m.lines} lines"
        for m in modules.values()
        if m.lines > limit and m.path.relative_to(repo).as_posix() not in allowed
    )


# -- the package ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, Module]:
    found = read_package(PACKAGE_DIR)
    assert len(found) > 40, f"read only {len(found)} modules from {PACKAGE_DIR}"
    return found


def test_every_module_has_a_layer_and_imports_only_modules_that_exist(modules: dict[str, Module]) -> None:
    assert unplaced_modules(modules) == [], f"not in any layer: add it to one {LAYERS}"
    assert unknown_imports(modules) == []


def test_no_module_imports_a_higher_layer(modules: dict[str, Module]) -> None:
    assert upward_imports(modules) == []


def test_package_face_stays_at_the_bottom(modules: dict[str, Module]) -> None:
    """p2pimg/__init__.py runs before any p2pimg module: it may import only kernel and content."""
    face = [i.target for i in modules["p2pimg"].imports if internal(i.target, "p2pimg")]
    assert face and all((layer_of(t) or 0) <= LAYERS.index(FACE_LAYER) and t != "p2pimg" for t in face), face
    assert not any(i.target == "p2pimg.__main__" for m in modules.values() for i in m.imports)


def test_no_import_cycles(modules: dict[str, Module]) -> None:
    assert import_cycles(modules) == []


def test_content_layer_has_no_io_runtime(modules: dict[str, Module]) -> None:
    content = [name for name in modules if layer_of(name) == LAYERS.index("content") and name != "p2pimg"]
    assert content
    assert forbidden_imports(modules, content, CONTENT_FORBIDDEN) == []


def test_fetch_schedule_is_pure(modules: dict[str, Module]) -> None:
    if SCHEDULE not in modules:
        pytest.skip("p2pimg/fetch/schedule.py does not exist yet (being written alongside the engine)")
    assert forbidden_imports(modules, [SCHEDULE], SCHEDULE_FORBIDDEN) == []


def test_no_module_is_over_the_line_limit(modules: dict[str, Module]) -> None:
    assert oversize(modules, PACKAGE_DIR.parent) == [], (
        f"split modules over {MAX_LINES} lines (or, only while someone splits one, allow it)"
    )


# -- the checks can fail ----------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> dict[str, Module]:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return read_package(root / "p2pimg")


def test_the_checks_catch_a_made_up_package_breaking_each_rule(tmp_path: Path) -> None:
    modules = _write(
        tmp_path,
        {
            "p2pimg/__init__.py": "from p2pimg.content.cid import Cid\n",
            "p2pimg/__main__.py": "from p2pimg.cli import main\n",
            "p2pimg/errors.py": "",
            "p2pimg/content/__init__.py": "",
            "p2pimg/content/cid.py": "import threading\nfrom p2pimg.errors import *\n",
            "p2pimg/content/model.py": (
                "from . import cid\ndef late():\n    from p2pimg.web.registry import handle\n"
            ),  # upward, in a function
            "p2pimg/store/__init__.py": "",
            "p2pimg/store/chunks.py": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n    from p2pimg.node.node import Node\n"  # upward, for types only
                "from p2pimg.store import index\n"
            ),
            "p2pimg/store/index.py": "import p2pimg.store.chunks\nfrom p2pimg.tasks import x\n",  # a cycle
            "p2pimg/tasks.py": "import trio\n",  # kernel: allowed here, not for content reaching it
            "p2pimg/fetch/__init__.py": "",
            "p2pimg/fetch/schedule.py": "from time import monotonic\nfrom ..content import model\n",
            "p2pimg/node/__init__.py": "",
            "p2pimg/node/node.py": "from p2pimg.web import registry\n",  # upward
            "p2pimg/web/__init__.py": "",
            "p2pimg/web/registry.py": "from ..content.model import late\nfrom p2pimg.nothere import y\n",
            "p2pimg/cli/__init__.py": "",
            "p2pimg/cli/main.py": "from p2pimg import __version__\n" + "x = 1\n" * 700,
            "p2pimg/extra.py": "",  # in no layer
        },
    )
    assert modules["p2pimg.content.model"].imports[0].target == "p2pimg.content.cid"
    assert unplaced_modules(modules) == ["p2pimg.extra"]
    assert unknown_imports(modules) == [
        "p2pimg.web.registry:2 imports p2pimg.nothere, which is not a module of p2pimg"
    ]
    assert sorted(upward_imports(modules)) == [
        "p2pimg.content.model:3 (content) imports p2pimg.web.registry (web) in a function",
        "p2pimg.node.node:1 (node) imports p2pimg.web.registry (web)",
        "p2pimg.store.chunks:3 (store) imports p2pimg.node.node (node) under TYPE_CHECKING",
    ]
    assert sorted(import_cycles(modules)) == [
        ["p2pimg.content.model", "p2pimg.web.registry"],
        ["p2pimg.store.chunks", "p2pimg.store.index"],
    ]
    assert forbidden_imports(modules, ["p2pimg.content.cid"], CONTENT_FORBIDDEN) == [
        "p2pimg.content.cid:1 imports threading"
    ]
    assert forbidden_imports(modules, ["p2pimg.fetch.schedule"], SCHEDULE_FORBIDDEN) == [
        "p2pimg.content.cid:1 imports threading",
        "p2pimg.fetch.schedule:1 imports time",
    ]
    # what a module reaches counts: store.chunks -> store.index -> tasks -> trio, and through
    # node.node -> web.registry -> content.model -> content.cid -> threading
    assert forbidden_imports(modules, ["p2pimg.store.chunks"], CONTENT_FORBIDDEN) == [
        "p2pimg.content.cid:1 imports threading",
        "p2pimg.tasks:1 imports trio",
    ]
    assert oversize(modules, tmp_path) == ["p2pimg/cli/main.py: 701 lines"]
    assert oversize(modules, tmp_path, frozenset({"p2pimg/cli/main.py"})) == []


def test_the_checks_pass_a_made_up_package_that_keeps_the_rules(tmp_path: Path) -> None:
    modules = _write(
        tmp_path,
        {
            "p2pimg/__init__.py": "",
            "p2pimg/errors.py": "",
            "p2pimg/content/__init__.py": "",
            "p2pimg/content/cid.py": "import hashlib\nfrom p2pimg.errors import E\n",
            "p2pimg/web/__init__.py": "",
            "p2pimg/web/server.py": (
                "import trio\nfrom p2pimg.content import cid\nfrom p2pimg import errors\n"
            ),
        },
    )
    assert unplaced_modules(modules) == unknown_imports(modules) == upward_imports(modules) == []
    assert import_cycles(modules) == []
    assert forbidden_imports(modules, ["p2pimg.content.cid"], CONTENT_FORBIDDEN) == []
