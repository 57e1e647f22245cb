"""runtime/ is the ground floor: importing it must not pull torch, transformers or peft."""

import pkgutil
import subprocess
import sys

import runtime

from .conftest import REPO


def test_runtime_imports_without_torch():
    modules = [m.name for m in pkgutil.walk_packages(runtime.__path__, "runtime.")]  # sub-packages too
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'pandas') if m in sys.modules]\n"
        "print(','.join(bad))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert len(modules) >= 5 and {"runtime.scheduling.process", "runtime.serving.app"} <= set(modules)
