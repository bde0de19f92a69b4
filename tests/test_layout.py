"""The package layout stays true to the architecture README describes: one folder per
role, dependencies pointing one way, no import cycle, the low-bit library behind its
boundary, and ``autogen_local`` free of torch and of this package.

Imports are read with ``ast`` (every import, including those inside functions), so the
rules hold for lazy imports too.
"""
import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "fastchat_bigdl"

# role -> the roles it may import. "root" is the package's __init__, "adapter" the
# FastChat adapter module; the entry points are named by module.
ALLOWED: Dict[str, Set[str]] = {
    "common": set(),
    "lowbit": {"common"},
    "engine": {"lowbit", "common"},
    "adapter": {"lowbit", "common"},
    "root": {"adapter", "common"},
    "worker": {"engine", "lowbit", "common", "adapter"},
    "api": {"common"},
    "web": {"common"},
    "stack": {"common", "lowbit", "api", "worker", "adapter"},
    "bench": {"common", "lowbit", "engine", "api", "worker", "stack", "adapter"},
    "cli": {"stack", "bench", "common", "root"},
    "__main__": {"cli"},
    "model_worker": {"worker"},
    "openai_api_server": {"api"},
}
LOW_BIT_LIBRARIES = ("ipex_llm", "bigdl", "intel_extension_for_pytorch")
HEAVY_FOR_CLIENTS = ("torch", "transformers", "fastchat", PACKAGE)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str = "") -> Set[str]:
    """Absolute names of every module ``path`` (module ``name``) imports: ``from x import
    y`` yields both x and x.y, so a submodule imported that way counts."""
    name = name or module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            found.add(node.args[0].value)
    return found


def package_modules(top: str) -> Dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / top).rglob("*.py"))}


MODULES = package_modules(PACKAGE)


def internal_imports(path: Path, name: str = "") -> Set[str]:
    name = name or module_name(path)
    return {m for m in imports_of(path, name) if m in MODULES and m != name}


def role(module: str) -> str:
    parts = module.split(".")
    return "root" if len(parts) == 1 else parts[1]


def direction_violations(modules: Dict[str, Path]) -> List[str]:
    wrong = []
    for name, path in modules.items():
        for target in internal_imports(path, name):
            if role(target) != role(name) and role(target) not in ALLOWED[role(name)]:
                wrong.append(f"{name} imports {target} ({role(name)} -> {role(target)})")
    return wrong


def find_cycle(graph: Dict[str, Set[str]]) -> Optional[List[str]]:
    state: Dict[str, int] = {}
    path: List[str] = []

    def visit(node) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def import_graph(modules: Dict[str, Path]) -> Dict[str, Set[str]]:
    return {name: internal_imports(path, name) for name, path in modules.items()}


def test_every_module_belongs_to_a_known_role_and_says_why_it_exists():
    for name, path in MODULES.items():
        assert role(name) in ALLOWED, f"{name} is outside the layout; put it in one of {sorted(ALLOWED)}"
        assert ast.get_docstring(ast.parse(path.read_text())), f"{name} has no module docstring"


def test_dependencies_point_one_way():
    wrong = direction_violations(MODULES)
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle():
    cycle = find_cycle(import_graph(MODULES))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_only_lowbit_imports_the_low_bit_library():
    offenders = [
        f"{name} imports {target}"
        for name, path in MODULES.items() if role(name) != "lowbit"
        for target in imports_of(path) if target.split(".")[0] in LOW_BIT_LIBRARIES
    ]
    assert not offenders, "\n".join(offenders)


def test_autogen_local_is_torch_free_and_independent():
    offenders = [
        f"{name} imports {target}"
        for name, path in package_modules("autogen_local").items()
        for target in imports_of(path) if target.split(".")[0] in HEAVY_FOR_CLIENTS
    ]
    assert not offenders, "\n".join(offenders)


def test_the_checks_catch_a_forbidden_direction_and_a_cycle(tmp_path):
    """The checker itself, on the real modules plus a planted offender."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from fastchat_bigdl.api import server\n")
    planted = {**MODULES, "fastchat_bigdl.worker.probe": probe}
    assert "fastchat_bigdl.worker.probe imports fastchat_bigdl.api.server (worker -> api)" in \
        direction_violations(planted)
    root_user = tmp_path / "root_user.py"
    root_user.write_text("import fastchat_bigdl\n")  # the package root is a role like any other
    planted = {**MODULES, "fastchat_bigdl.api.root_user": root_user}
    assert "fastchat_bigdl.api.root_user imports fastchat_bigdl (api -> root)" in direction_violations(planted)
    graph = import_graph(MODULES)
    graph["fastchat_bigdl.common.paths"] = graph["fastchat_bigdl.common.paths"] | {"fastchat_bigdl.common.netenv"}
    graph["fastchat_bigdl.common.netenv"] = graph["fastchat_bigdl.common.netenv"] | {"fastchat_bigdl.common.paths"}
    assert find_cycle(graph) is not None
