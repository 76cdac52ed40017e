"""Linters run as tests: ruff and mypy on the Python, shellcheck on the shell scripts."""

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(PROJECT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_mypy_clean():
    """The package type-checks (its settings: pyproject.toml, [tool.mypy])."""
    package = PROJECT / "pipeline" / "leanvm"
    result = subprocess.run([sys.executable, "-m", "mypy", "--cache-dir", "/dev/null", str(package)],
                            capture_output=True, text=True, cwd=PROJECT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_runtime_is_mypy_strict_clean():
    """What out/ carries (leanvm.runtime, and the zipapp's builder) type-checks under --strict."""
    package = PROJECT / "pipeline" / "leanvm"
    result = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", "/dev/null",
                             str(package / "runtime"), str(package / "ship" / "runtime.py")],
                            capture_output=True, text=True, cwd=PROJECT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_are_shellcheck_clean():
    scripts = [*PROJECT.glob("pipeline/**/*.sh"), PROJECT / ".ci" / "run"]
    assert scripts
    result = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


# The package's layers, each importing only from those before it (README, "Where things live").
LAYERS = [{"errors", "proc", "fsutil", "resources", "arch"}, {"state"}, {"config"}, {"release", "vm", "runtime"},
          {"ship"}, {"dag"}]


def test_imports_point_down_the_layers():
    import ast

    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    wrong = []
    for path in (PROJECT / "pipeline" / "leanvm").rglob("*.py"):
        parts = path.relative_to(PROJECT / "pipeline" / "leanvm").with_suffix("").parts
        own = parts[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            for name in names:
                if not name.startswith("leanvm."):
                    assert not name.startswith(("pipeline", "leanvm_dev")), (path, name)
                    continue
                used = name.split(".")[1]
                if used != own and (layer[used] > layer[own] or layer[used] == layer[own] > 0):  # base: may use itself
                    wrong.append(f"{path.relative_to(PROJECT)} imports {name}")
    assert wrong == []


def package_functions():
    import ast

    for path in (PROJECT / "pipeline").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                yield path, node


def test_every_function_is_under_40_lines():
    long = [f"{path.relative_to(PROJECT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, node in package_functions() if node.end_lineno - node.lineno + 1 >= 40]
    assert long == []


def test_no_python_string_in_the_package_holds_shell():
    """Shell lives in real files (resources/*.sh) that shellcheck reads, never in strings."""
    import ast

    shell_marks = ("#!/bin/sh", "set -eu", "; then", "\nfi\n", "$(")
    found = []
    for path in (PROJECT / "pipeline" / "leanvm").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if any(mark in node.value for mark in shell_marks):
                    found.append(f"{path.relative_to(PROJECT)}:{node.lineno}")
    assert found == []


def test_the_generated_lib_sh_is_shellcheck_clean(tmp_path: Path):
    """out/lib.sh as doit writes it: the generated head (out/ names, arch table), then lib.sh."""
    from leanvm.state.shellfacts import lib_sh

    (tmp_path / "lib.sh").write_text(lib_sh())
    result = subprocess.run(["shellcheck", str(tmp_path / "lib.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_the_shell_spells_no_out_name_of_its_own():
    """Each out/ name is spelled once (Layout's Names): the shell joins the variables the
    generated head of out/lib.sh gives it, never a name of its own ($dir/qemu.pid)."""
    import re

    from leanvm.state.layout import names

    spelled = re.compile(r'\$\{?[A-Za-z_0-9]+\}?"?/(' + "|".join(map(re.escape, names().values())) + r")(?![\w-])")
    found = []
    for script in sorted((PROJECT / "pipeline" / "leanvm" / "resources").glob("*.sh")):
        for number, line in enumerate(script.read_text().splitlines(), 1):
            if not line.lstrip().startswith("#") and spelled.search(line):
                found.append(f"{script.name}:{number}: {line.strip()}")
    assert found == []
