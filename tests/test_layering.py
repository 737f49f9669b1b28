"""The import rule of ARCHITECTURE.md, read from the source: stages import the foundation and never each other,
imports flow one way (cli -> benchmark -> quality, deploy -> stages -> foundation), no circle, no private name crosses a
file, only the CLI imports typer or rich, and modeling.py stays self-contained (export copies it verbatim)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gisp_deploy

PACKAGE = Path(gisp_deploy.__file__).resolve().parent
STAGES = ("pruning", "slicing", "serving")
LEVEL = {"pruning": 1, "slicing": 1, "serving": 1, "deploy": 2, "quality": 2, "benchmark": 3, "cli": 4}  # else 0


def _modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        parts = f.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


MODULES = _modules()


def _group(module: str) -> str:
    """The stage or layer a module belongs to ("foundation" for the flat top and kernels/)."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LEVEL else "foundation"


def _imports(module: str, path: Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every import in the file, lazy ones included."""
    is_package = path.name == "__init__.py"
    base = module.split(".") if is_package else module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[:len(base) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:
                sub = f"{target}.{a.name}"
                found.append((sub, "", node.lineno) if sub in MODULES else (target, a.name, node.lineno))
    return found


def _package_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for module, path in MODULES.items():
        for target, _, _ in _imports(module, path):
            while target and target not in MODULES:  # `import gisp_deploy.x.y` names its module
                target = target.rpartition(".")[0]
            if target and target != module and target != "gisp_deploy":
                edges[module].add(target)
    return edges


def test_imports_flow_one_way():
    wrong = []
    for module, targets in _package_edges().items():
        here = _group(module)
        for target in targets:
            there = _group(target)
            if there == "cli" and here != "cli":
                wrong.append(f"{module} imports {target}: nothing imports the CLI")
            elif LEVEL.get(there, 0) > LEVEL.get(here, 0):
                wrong.append(f"{module} ({here}) imports {target} ({there}), a higher layer")
            elif here in STAGES and there in STAGES and here != there:
                wrong.append(f"{module} imports {target}: stage {here} never imports stage {there}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    edges = _package_edges()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m, trail):
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycle.extend(trail[trail.index(t):] + [t] if t in trail else [m, t])
                return True
            if t not in state and visit(t, trail + [t]):
                return True
        state[m] = 2
        return False

    for m in sorted(edges):
        if m not in state and visit(m, [m]):
            break
    assert not cycle, " -> ".join(cycle)


def test_no_private_name_crosses_a_file():
    crossing = [f"{m}:{line} imports {name} from {target}"
                for m, path in MODULES.items() for target, name, line in _imports(m, path)
                if name.startswith("_") and not name.startswith("__") and target.startswith("gisp_deploy")]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("library", ["typer", "rich"])
def test_only_the_cli_imports_the_terminal_libraries(library):
    users = sorted({m for m, path in MODULES.items() for target, _, _ in _imports(m, path)
                    if target.split(".")[0] == library and _group(m) != "cli"})
    assert not users, f"{library} imported outside gisp_deploy/cli: {users}"


def test_modeling_is_self_contained():
    targets = {t.split(".")[0] for t, _, _ in _imports("gisp_deploy.modeling", MODULES["gisp_deploy.modeling"])}
    assert targets <= {"__future__", "contextlib", "copy", "dataclasses", "torch", "transformers"}, targets


def test_the_rule_catches_a_wrong_import(tmp_path, monkeypatch):
    """The checks above read real files: a stage importing another stage is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text("from ..slicing.loader import load\nfrom ..cli import app\nfrom ..layout import _hidden\n")
    monkeypatch.setitem(MODULES, "gisp_deploy.pruning.probe", probe)
    with pytest.raises(AssertionError, match="stage pruning never imports stage slicing") as e:
        test_imports_flow_one_way()
    assert "nothing imports the CLI" in str(e.value)
    with pytest.raises(AssertionError, match="imports _hidden from gisp_deploy.layout"):
        test_no_private_name_crosses_a_file()


def test_test_modules_share_helpers_only_through_the_factory():
    tests = Path(__file__).resolve().parent
    wrong = []
    for f in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            wrong += [f"{f.relative_to(tests)} imports {n}" for n in names
                      if n.split(".")[0] == "tests" and n != "tests.factory" or n.split(".")[0].startswith("test_")]
    assert not wrong, "\n".join(wrong)
