"""The algorithm stands alone: nothing in dreamerv2_tf/algo/ imports the training machinery (loop/) or the
tools around runs (tools/), by any spelling of the import or through another module."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ALGO = ROOT / "dreamerv2_tf" / "algo"
FORBIDDEN = ("dreamerv2_tf.loop", "dreamerv2_tf.tools")


def imported_modules(path: Path) -> list[str]:
    """Absolute names of the modules a file imports, relative imports resolved (`from ..loop import x`
    is dreamerv2_tf.loop.x), wherever the import statement stands."""
    package = "dreamerv2_tf.algo"
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names += [base] + [f"{base}.{alias.name}" for alias in node.names]
    return names


def forbidden(name: str) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in FORBIDDEN)


def test_no_algo_module_imports_loop_or_tools():
    files = sorted(ALGO.glob("*.py"))
    assert len(files) > 5
    found = {path.name: [name for name in imported_modules(path) if forbidden(name)] for path in files}
    assert not {name: bad for name, bad in found.items() if bad}


def test_the_import_check_sees_every_spelling(tmp_path):
    spellings = ["from dreamerv2_tf.loop import distribute", "import dreamerv2_tf.tools.flops",
                 "from ..loop.distribute import replicated", "from .. import tools",
                 "def f():\n    from dreamerv2_tf.loop.checkpoint import restore_weights"]
    for text in spellings:
        path = tmp_path / "module.py"
        path.write_text(text + "\n")
        assert any(forbidden(name) for name in imported_modules(path)), text


def test_importing_the_algorithm_loads_no_loop_or_tools_module():
    # Every algo module, in a fresh process: no transitive import reaches loop/ or tools/ either.
    modules = sorted(f"dreamerv2_tf.algo.{path.stem}" for path in ALGO.glob("*.py") if path.stem != "__init__")
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n    importlib.import_module(name)\n"
            f"print(sorted(name for name in sys.modules if name.startswith({FORBIDDEN!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
