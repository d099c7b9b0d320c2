"""The IPU host runs Python 3.8 (Poplar SDK 3.3/3.4), which cannot be installed here:
check the code for anything newer instead, in syntax, standard library and builtins."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG, ROOT

SOURCES = [ROOT / "finetune_electra.py", *sorted((ROOT / "tests").glob("*.py")),
           *sorted((ROOT / "benchmarks").glob("*.py"))]
# Methods of builtins that vermin cannot see on a variable (it knows only literals' types).
NEWER_METHODS = {"removeprefix": "3.9", "removesuffix": "3.9", "is_relative_to": "3.9",
                 "with_stem": "3.9", "bit_count": "3.10"}


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_syntax_is_python_38(path):
    ast.parse(path.read_text(), filename=str(path), feature_version=(3, 8))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: p.name)
def test_no_builtin_methods_newer_than_python_38(path):
    found = [(node.lineno, node.attr) for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Attribute) and node.attr in NEWER_METHODS]
    found += [(node.lineno, "zip(..., strict)") for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "zip"
              and any(k.arg == "strict" for k in node.keywords)]
    assert found == [], f"{path.name}: Python 3.9+ only: {found}"


def test_vermin_finds_nothing_newer_than_python_38():
    """vermin knows which Python each standard-library module, function and syntax needs."""
    vermin = Path(sys.executable).with_name("vermin")
    if not vermin.exists():
        pytest.skip("vermin is not installed (it is in the requirements-*test.txt files)")
    proc = subprocess.run([str(vermin), "-t=3.8-", "--no-tips", "--violations",
                           "--eval-annotations", *map(str, SOURCES)],
                          capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stdout[-3000:]
