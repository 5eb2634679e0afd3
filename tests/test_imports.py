"""The trainer is the top of the package's import graph: no library module imports it (a module
that did would close a circle through the trainer's own imports, as plan.py once did)."""

import ast
from pathlib import Path

import qvl_train

PACKAGE = Path(qvl_train.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing module's package
                parts = path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level]
                base = ".".join([*parts, *([base] if base else [])])
            names.update({base, *(f"{base}.{a.name}" for a in node.names)})
    return names


def test_no_library_module_imports_the_trainer():
    importers = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
                 if p.name != "trainer.py" and "qvl_train.train.trainer" in _imported_modules(p)]
    assert importers == []
