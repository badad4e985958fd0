"""The package's import layers (README "Layers"): the import-linter contracts of pyproject.toml hold, and the
modules that must stay cheap to import load neither torch nor the models nor the C++ extension.

    .venv/bin/python -m pytest -q tests/test_layers.py
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINT_IMPORTS = os.path.join(os.path.dirname(sys.executable), "lint-imports")


def test_import_contracts_hold():
    assert os.path.isfile(LINT_IMPORTS), f"{LINT_IMPORTS} is missing: pip install -r requirements-cpu.txt"
    run = subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo"], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("module", ["structalign.metrics", "structalign.landmarks"])
def test_module_imports_without_torch_models_or_extension(module):
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'structalign.models', "
            "'structalign.ops', 'structalign._C'))))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", f"import {module} loaded {run.stdout.strip()}"
