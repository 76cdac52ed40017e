"""Linters run as tests: ruff on the Python, shellcheck on the shell scripts."""

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(PROJECT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_shell_scripts_are_shellcheck_clean():
    scripts = [*PROJECT.glob("pipeline/*.sh"), PROJECT / ".ci" / "run"]
    assert scripts
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
