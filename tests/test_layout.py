"""The package layout shows the architecture: library, private core, workbook, toy training.

The loss library (``hdn`` and ``hdn._core``) must never import the workbook helpers
(``hdn.workbook``) or the toy training stack (``hdn.toy``), and the core must not import the
rest of the library.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "hdn"
LIBRARY = sorted(p for p in PACKAGE.glob("*.py")) + sorted((PACKAGE / "_core").glob("*.py"))


def _imported_modules(path: Path) -> set[str]:
    """Absolute names of every module that ``path`` imports, at any depth of the file."""
    tree = ast.parse(path.read_text())
    package = ".".join(("hdn",) + path.relative_to(PACKAGE).parent.parts)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_module_never_imports_workbook_or_toy(path):
    bad = {m for m in _imported_modules(path) if m.startswith(("hdn.workbook", "hdn.toy"))}
    assert not bad, f"{path.name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "_core").glob("*.py")), ids=lambda p: p.name)
def test_core_imports_only_itself(path):
    bad = {
        m for m in _imported_modules(path)
        if m.startswith("hdn") and not m.startswith("hdn._core") and m != "hdn"
    }
    assert not bad, f"{path.name} imports {sorted(bad)}"


def test_importing_the_library_loads_no_workbook_or_toy_module():
    code = (
        "import sys, hdn, hdn.reference, hdn.data\n"
        "print(sorted(m for m in sys.modules if m.startswith(('hdn.workbook', 'hdn.toy'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
