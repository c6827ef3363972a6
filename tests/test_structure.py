"""The package's shape: the layers contract (import-linter), no import cycles, bounded sizes,
one safetensors header parser. scripts/structure.py prints the same figures."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import structure  # noqa: E402

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def test_layers_contract():
    """`lint-imports` with pyproject.toml's layers contract: each layer imports only from below."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("lint-imports is missing: pip install -e '.[test]' (import-linter)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_no_import_cycles():
    report = structure.report()
    assert report["cycles"] == [], report["cycles"]


def test_module_and_function_sizes():
    report = structure.report()
    big = {m: n for m, n in report["sizes"].items() if n > MAX_MODULE_LINES}
    assert not big, f"modules over {MAX_MODULE_LINES} lines: {big}"
    long = [(f, n) for f, n, _ in report["longest_functions"] if n > MAX_FUNCTION_LINES]
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_one_module_parses_safetensors_headers():
    """Only io/reader.py reads a header's length prefix; everything else goes through it."""
    readers = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "minimax_m3_mlx").rglob("*.py")
                     if 'unpack("<Q"' in p.read_text() or "data_offsets\"]" in p.read_text())
    assert readers == ["minimax_m3_mlx/io/reader.py"], readers
