"""Imports between distributions run one way: the core imports nothing of ours above it.

The conformance suite and the backends import the core; were the core to
import them (as ``pagedkv conformance`` once did), a core-only install would
break and the layers would no longer be separable. They extend the core
through plugin hooks instead. Checked on the source, so a lazy import inside a
function is caught as well as one at the top of a module.
"""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "pagedkv_core"
ABOVE_THE_CORE = ["pagedkv_conformance", "pagedkv_numpy", "pagedkv_torch", "pagedkv_mlx", "pagedkv_cupy"]
DYNAMIC_IMPORTS = {"import_module", "__import__", "find_spec"}


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every import statement and every ``import_module("...")``-style call with a literal."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in DYNAMIC_IMPORTS and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_the_core_has_modules_to_check():
    assert len(list(CORE.rglob("*.py"))) > 20


@pytest.mark.parametrize("package", ABOVE_THE_CORE)
def test_the_core_never_imports_a_distribution_above_it(package):
    offenders = [f"{path.relative_to(CORE.parent)}:{line}: {module}"
                 for path in sorted(CORE.rglob("*.py"))
                 for line, module in _imported_modules(path)
                 if module == package or module.startswith(f"{package}.")]
    assert offenders == [], f"pagedkv_core imports {package}; add a plugin hook instead"


def test_the_check_sees_lazy_and_dynamic_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from pagedkv_conformance.runner import run_conformance\n"
                      "    import importlib\n    importlib.import_module('pagedkv_numpy.storage')\n")
    assert [m for _, m in _imported_modules(source)] == ["pagedkv_conformance.runner", "importlib",
                                                         "pagedkv_numpy.storage"]


# -- inside the core: vocabulary <- blocks <- contract <- plugins <- policy <- interfaces <- manager <- remote <- app

LEVELS = {"blocks": 1, "contract": 2, "plugins": 3, "policy": 4, "stats": 5, "interfaces": 5, "manager": 6,
          "remote": 7, "app": 8}
VOCABULARY = 0  # errors, events, dtypes, config, layers, memory
# The one import that runs upward, on purpose: ``manager.attach_remote(tier)`` builds the remote tier's
# connector (imported when called). The remote tier itself is typed against a Protocol, never the manager.
UPWARD_ALLOWED = {(("manager", "facade"), ("remote",))}


def _level(parts: tuple[str, ...]) -> int:
    return LEVELS.get(parts[0], VOCABULARY) if parts else VOCABULARY


def _core_imports(path: Path, root: Path = CORE) -> list[tuple[int, tuple[str, ...]]]:
    """(line, module path inside pagedkv_core) of every run-time import of a core module, relative or absolute."""
    here = path.relative_to(root).with_suffix("").parts
    package = here[:-1]
    found = []
    tree = ast.parse(path.read_text(), filename=str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and getattr(block.test, "id", getattr(block.test, "attr", "")) == "TYPE_CHECKING"
                   for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue  # annotations only: no import at run time
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                target = base + tuple((node.module or "").split(".")) if node.module else base
                names = [target + (a.name,) for a in node.names] if not node.module else [target]
                found += [(node.lineno, tuple(p for p in t if p)) for t in names]
            elif node.module and node.module.startswith("pagedkv_core"):
                found.append((node.lineno, tuple(node.module.split(".")[1:])))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, tuple(a.name.split(".")[1:])) for a in node.names
                      if a.name.startswith("pagedkv_core")]
    return found


def test_imports_inside_the_core_run_one_way():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        rel = path.relative_to(CORE).with_suffix("").parts
        if rel == ("__init__",):
            continue  # the package re-exports every public name
        mine = _level(rel)
        for line, target in _core_imports(path):
            if (rel, target) in UPWARD_ALLOWED:
                continue
            if target and target[0] != rel[0] and _level(target) > mine:
                offenders.append(f"{'/'.join(rel)}.py:{line} imports {'.'.join(target)}")
    assert offenders == [], "imports must run vocabulary <- blocks <- contract <- plugins <- policy <- " \
                            "interfaces <- manager <- remote <- app:\n" + "\n".join(offenders)


def test_the_direction_check_catches_an_upward_import(tmp_path):
    fake = tmp_path / "pagedkv_core"
    (fake / "blocks").mkdir(parents=True)
    (fake / "blocks" / "pool.py").write_text("from ..manager.facade import PagedKvCacheManager\n"
                                             "from typing import TYPE_CHECKING\n"
                                             "if TYPE_CHECKING:\n    from ..app import cli\n")
    found = _core_imports(fake / "blocks" / "pool.py", fake)
    assert found == [(1, ("manager", "facade"))]  # the typing-only import does not count
    assert _level(found[0][1]) > _level(("blocks", "pool"))
