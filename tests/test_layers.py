"""The layer contract: every module imports only from its own layer or the layers
below it, and no two modules import each other, directly or around a circle.

Layers, top to bottom: the public face (the package's `__init__`, `attr`, the
option, error and report modules, the execution paths, the command line, the
demo and the widget) -> `parallel` -> `engine` -> `approx` -> `plan` -> `ops` ->
`capture` -> `kernels`. Imports are read from the sources with `ast`, at module
level and inside functions alike; imports under `if TYPE_CHECKING:` never run and
are skipped.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "captum_krypton"
#: Where each package's sources live (pyproject's [tool.setuptools.package-dir]).
SOURCE_DIRS = {PACKAGE: ROOT / "captum_krypton", f"{PACKAGE}.widget": ROOT / "widget"}

LAYERS = ("public", "parallel", "engine", "approx", "plan", "ops", "capture", "kernels")

PUBLIC_MODULES = (
    "attr",
    "outputs",
    "options",
    "errors",
    "captum_path",
    "chunks",
    "devices_path",
    "progressive_path",
    "reports",
    "cli",
    "__main__",
    "demo",
    "widget",
)
#: Module or package -> layer; a module not named takes its closest package's.
LAYER_OF = {
    PACKAGE: "public",
    **{f"{PACKAGE}.{name}": "public" for name in PUBLIC_MODULES},
    f"{PACKAGE}.parallel": "parallel",
    f"{PACKAGE}.engine": "engine",
    f"{PACKAGE}.approx": "approx",
    f"{PACKAGE}.plan": "plan",
    f"{PACKAGE}.ops": "ops",
    f"{PACKAGE}.capture": "capture",
    f"{PACKAGE}.kernels": "kernels",
}


@dataclass(frozen=True)
class Source:
    text: str
    is_package: bool = False


def read_sources() -> dict[str, Source]:
    """Every module of the package, by dotted name."""
    sources = {}
    for package, directory in SOURCE_DIRS.items():
        for path in directory.rglob("*.py"):
            parts = path.relative_to(directory).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *(parts[:-1] if is_package else parts)))
            sources[name] = Source(path.read_text(), is_package)
    return sources


def layer_of(module: str) -> str | None:
    name = module
    while name:
        if name in LAYER_OF and (name != PACKAGE or module == PACKAGE):
            return LAYER_OF[name]
        name = name.rpartition(".")[0]
    return None


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for child in ast.walk(node))
    return skipped


def _known(name: str, modules: dict[str, Source]) -> str | None:
    """`name`, or the closest package above it, when it is a module of ours."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, modules: dict[str, Source]) -> set[str]:
    """The package's modules that `module` imports (a name imported from a
    package counts as the package's, unless it is a submodule)."""
    source = modules[module]
    tree = ast.parse(source.text)
    skipped = _type_checking_nodes(tree)
    package = module if source.is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(_known(alias.name, modules) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else _known(base, modules))
    found.discard(None)
    found.discard(module)
    return found  # type: ignore[return-value]


def upward_imports(modules: dict[str, Source]) -> list[str]:
    """Every import of a module from a layer above its own."""
    found = []
    for module in sorted(modules):
        rank = LAYERS.index(layer_of(module))  # type: ignore[arg-type]
        for imported in sorted(imports_of(module, modules)):
            imported_layer = layer_of(imported)
            if LAYERS.index(imported_layer) < rank:  # type: ignore[arg-type]
                found.append(f"{module} ({layer_of(module)}) imports {imported} ({imported_layer})")
    return found


def import_circles(modules: dict[str, Source]) -> list[list[str]]:
    """The groups of modules that import each other around a circle (Tarjan)."""
    graph = {module: sorted(imports_of(module, modules)) for module in modules}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for imported in graph[module]:
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            group = []
            while not group or group[-1] != module:
                group.append(stack.pop())
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


@pytest.fixture(scope="module")
def modules() -> dict[str, Source]:
    return read_sources()


def test_every_module_has_a_layer(modules):
    assert f"{PACKAGE}.attr" in modules and f"{PACKAGE}.widget.occlusion" in modules
    assert [m for m in sorted(modules) if layer_of(m) is None] == []


def test_modules_import_only_their_layer_and_the_layers_below(modules):
    assert upward_imports(modules) == []


def test_no_import_circles(modules):
    assert import_circles(modules) == []


def test_the_checks_catch_what_they_are_for():
    """Synthetic modules: an engine module importing the public face inside a
    function is flagged, a type-only import is not, and a circle is found."""
    modules = {
        f"{PACKAGE}.attr": Source("from captum_krypton.engine import runner\n"),
        f"{PACKAGE}.engine": Source("", is_package=True),
        f"{PACKAGE}.engine.runner": Source(
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from captum_krypton.parallel import sharded\n"
            "def serve():\n"
            "    from ..attr import IncrementalOcclusion\n"
        ),
        f"{PACKAGE}.parallel": Source("", is_package=True),
        f"{PACKAGE}.parallel.sharded": Source("import captum_krypton.engine.runner\n"),
    }
    assert upward_imports(modules) == [
        "captum_krypton.engine.runner (engine) imports captum_krypton.attr (public)"
    ]
    assert import_circles(modules) == [["captum_krypton.attr", "captum_krypton.engine.runner"]]
