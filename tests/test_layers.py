"""The packages keep to their layers (README "Layout"): no import runs back up a layer."""

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.own_build  # the build under test is not used: one pass

PACKAGE = Path(__file__).resolve().parent.parent / "nbdserver"

# Each layer, and the layers above it that it must not import.  The top modules (cli, the
# daemon's entry points) may import anything.
LAYERS = {
    "protocol": {"block", "backing", "serving", "control", "process", "metrics", "cli"},
    "backing": {"block", "serving", "control", "process", "cli"},
    "block": {"serving", "control", "process", "cli"},  # above the engines it submits to
    "metrics": {"serving", "control", "process", "cli"},
    "serving": {"control", "process", "cli"},
    # Above the server it drives, below the process layer that starts it (and hands it over).
    "control": {"process", "cli"},
    "process": {"cli"},
    "config": {"serving", "control", "process", "cli"},
    "stats": {"serving", "control", "process", "cli"},
}


def imported_layers(path: Path) -> set[str]:
    """The first component below ``nbdserver`` of every module that ``path`` imports."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = module[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[tuple[str, ...]] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = (*base, *(node.module.split(".") if node.module else ()))
                names = [target] if node.module else [(*base, alias.name) for alias in node.names]
            elif node.module:
                names = [tuple(node.module.split("."))]
        elif isinstance(node, ast.Import):
            names = [tuple(alias.name.split(".")) for alias in node.names]
        found |= {name[1] for name in names if len(name) > 1 and name[0] == "nbdserver"}
    return found


def layer_of(path: Path) -> str:
    return path.relative_to(PACKAGE).with_suffix("").parts[0]


def test_no_import_runs_up_a_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        above = LAYERS.get(layer_of(path), set())
        for layer in sorted(imported_layers(path) & above):
            wrong.append(f"{path.relative_to(PACKAGE)} imports nbdserver.{layer}")
    assert not wrong, "\n".join(wrong)


def test_the_check_sees_relative_imports():
    """The checker itself: the connection's imports of the block layer are found."""
    assert {"block", "protocol", "config"} <= imported_layers(PACKAGE / "serving" / "connection.py")
    assert "serving" in imported_layers(PACKAGE / "process" / "handover.py")
