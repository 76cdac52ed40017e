"""Linters run as tests: ruff and mypy on the Python, shellcheck on the shell scripts."""

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", str(PROJECT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


def test_mypy_clean():
    """The package type-checks under --strict (pyproject.toml, [tool.mypy]: untyped libraries
    are Any, and leanvm may extend their classes)."""
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
LAYERS = [{"errors", "proc", "fsutil", "resources", "arch", "host"}, {"state"}, {"runtime"}, {"config"},
          {"release", "vm"}, {"ship"}, {"dag"}]


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


def test_the_entry_points_name_only_what_they_hand_over_to():
    """Each out/ name is spelled once (Layout's Names): the shell entry points name only what
    they hand over to (run.sh and cluster.sh: the runtime; libvirt.sh: its settings file), as
    Names spells it, and each is a few lines."""
    import re

    from leanvm.state.layout import Names

    allowed = {"run.sh": {Names.OUT_RUNTIME}, "cluster.sh": {Names.OUT_RUNTIME},
               "libvirt.sh": {f"{Names.OUT_LIBVIRT}/{Names.LIBVIRT_ENV}"}}
    resources = PROJECT / "pipeline" / "leanvm" / "resources"
    assert sorted(p.name for p in resources.glob("*.sh")) == sorted(allowed)
    for script, names in allowed.items():
        text = (resources / script).read_text()
        named = set(re.findall(r'\$out/([\w./-]+)"', text))
        assert named == names, (script, named)
        assert len(text.splitlines()) <= 20, script


def test_every_program_the_package_starts_goes_through_the_process_helper():
    """leanvm.proc.run starts every program, each with a deadline (its own, or proc's), in a
    session of its own that a timeout stops whole. subprocess appears only there and where the
    runtime starts what lives as long as a VM (QEMU in supervise.py, a detached launcher in
    launch.py); the one exec is cluster.sh ssh handing the terminal over to ssh (verbs.py)."""
    import ast

    package = PROJECT / "pipeline" / "leanvm"
    long_lived = {"runtime/supervise.py": {"Popen"}, "runtime/launch.py": {"Popen"}}
    handovers = {"runtime/verbs.py": {"execvp"}}
    wrong = []
    for path in package.rglob("*.py"):
        name = str(path.relative_to(package))
        if name == "proc.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            called = node.func if isinstance(node, ast.Call) else None
            if not (isinstance(called, ast.Attribute) and isinstance(called.value, ast.Name)):
                continue
            owner, attr = called.value.id, called.attr
            if owner == "subprocess" and attr not in long_lived.get(name, set()):
                wrong.append(f"{name}:{node.lineno} subprocess.{attr}")
            if owner == "os" and (attr.startswith(("exec", "spawn", "posix_spawn")) or attr in ("system", "popen")):
                if attr not in handovers.get(name, set()):
                    wrong.append(f"{name}:{node.lineno} os.{attr}")
    assert wrong == []
