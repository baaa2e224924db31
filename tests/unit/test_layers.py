"""The layer map of docs/ARCHITECTURE.md, checked on every import kvmpy's modules make.

Imports are read from the source (ast), at module level and inside functions alike;
those under `if TYPE_CHECKING:` are left out, as they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "kvmpy"

# The machine's parts: memory, buses, CPU state, boot, ACPI tables, devices. A fuzzer
# or a unit test drives them with memory in a bytearray: they never reach KVM.
WITHOUT_KVM = ("kvmpy.memory", "kvmpy.bus", "kvmpy.portcache", "kvmpy.cpu", "kvmpy.boot",
               "kvmpy.acpi", "kvmpy.devices", "kvmpy.virtio")
KVM = ("kvmpy.kvm", "kvmpy._kvm")
# Only the command line knows the lab (and the lab itself).
LAB = ("kvmpy.lab",)
MAY_IMPORT_LAB = ("kvmpy.cli", "kvmpy.lab")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(name: str) -> set[tuple[str, str]]:
    """(module, imported name) for every kvmpy import `name` makes when it runs."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[tuple[str, str]] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for stmt in child.orelse:
                    visit(stmt)
                continue
            if isinstance(child, ast.Import):
                found.update((alias.name, "") for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.add((sub, "") if sub in MODULES else (base, alias.name))
            visit(child)

    visit(ast.parse(path.read_text()))
    return {(module, what) for module, what in found if module.split(".")[0] == "kvmpy"}


GRAPH = {name: {module for module, _ in imports_of(name)} - {name} for name in MODULES}


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_machines_parts_never_import_the_kvm_layer() -> None:
    bad = [(name, dep) for name, deps in GRAPH.items() if _under(name, WITHOUT_KVM)
           for dep in deps if _under(dep, KVM)]
    assert bad == []


def test_only_the_command_line_knows_the_lab() -> None:
    bad = [(name, dep) for name, deps in GRAPH.items() if not _under(name, MAY_IMPORT_LAB)
           for dep in deps if _under(dep, LAB)]
    assert bad == []


def test_snapshots_sit_above_the_machine() -> None:
    """The snapshot directory, its files and its checks (kvmpy.state but its `values`)
    build on the machine; the machine and everything under it know of them only the
    plain values each part's state() and restore() use."""
    below = ("kvmpy.machine", *WITHOUT_KVM, *KVM, "kvmpy.exitloop", "kvmpy.vcpu_threads")
    bad = [(name, dep) for name, deps in GRAPH.items() if _under(name, below)
           for dep in deps if _under(dep, ("kvmpy.state",)) and dep != "kvmpy.state.values"]
    assert bad == []


def test_only_the_kvm_layer_loads_the_shim() -> None:
    bad = [name for name, deps in GRAPH.items()
           if "kvmpy._kvm" in deps and not _under(name, ("kvmpy.kvm",))]
    assert bad == []


def test_no_private_names_cross_a_package() -> None:
    bad = []
    for name in MODULES:
        for module, what in imports_of(name):
            if what.startswith("_") and not what.startswith("__") and \
                    module.rpartition(".")[0] != name.rpartition(".")[0]:
                bad.append((name, f"{module}.{what}"))
    assert bad == []


def test_no_import_cycles() -> None:
    """Tarjan's strongly connected components: every one must be a single module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                connect(w)
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
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            connect(v)
    assert cycles == []


def test_the_checks_see_real_imports() -> None:
    """The reader of imports finds what is there (or the tests above prove nothing)."""
    assert "kvmpy.kvm.exits" in GRAPH["kvmpy.exitloop"]
    assert "kvmpy.gdb.control" in GRAPH["kvmpy.gdb.stub"]  # `from .control import ...`
    assert "kvmpy.lab.command" in GRAPH["kvmpy.cli"]  # inside a function
    assert "kvmpy.kvm.vcpu" not in GRAPH["kvmpy.gdb.stub"]  # only under TYPE_CHECKING
