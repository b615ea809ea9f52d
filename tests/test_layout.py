"""The package's layering, checked with ast: no pass imports another pass (what passes share lives in
lowbit/quant or lowbit/ir; data one pass leaves for another goes through the PassContext)."""

from __future__ import annotations

import ast
from pathlib import Path

PASSES = Path(__file__).resolve().parent.parent / "lowbit" / "passes"
INFRASTRUCTURE = {"__init__", "base", "builtin", "manager", "dump"}  # the pass machinery, not passes


def _imported_siblings(path: Path) -> set[str]:
    """Names of modules of lowbit/passes that `path` imports (relative imports of level 1)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("lowbit.passes."):
            found.add(node.module.split(".")[2])
    return found


def test_no_pass_imports_another_pass():
    passes = {p.stem for p in PASSES.glob("*.py")} - INFRASTRUCTURE
    assert {"quantize", "fast_bias_correction", "smooth_quant", "cleanup"} <= passes
    offenders = {p.stem: sorted(_imported_siblings(p) & passes) for p in PASSES.glob("*.py")
                 if p.stem in passes and _imported_siblings(p) & passes}
    assert offenders == {}
