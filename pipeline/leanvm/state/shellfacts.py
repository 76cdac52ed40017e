"""out/lib.sh, and the rules Python asks of it.

A rule lives once. Names and tables Python owns (every out/ name: `Names`; the arch table:
`arch.FACTS`) reach the shell as the generated head of out/lib.sh. Rules about the running
host (is this VM's QEMU running, is a port taken, which accelerator) live in lib.sh, where
run.sh and cluster.sh need them without Python, and Python asks lib.sh (`ask`) instead of
deciding them a second time.
"""

import subprocess
from pathlib import Path

from leanvm.arch import FACTS
from leanvm.resources import SHELL_LIB
from leanvm.state.layout import names


def head() -> str:
    """The generated head of out/lib.sh: the out/ names and the arch table, as shell."""
    lines = ["# shellcheck shell=sh",
             "# --- written by doit from leanvm's Layout names (state/layout.py) and arch table",
             "# (arch.py); not to be edited. The functions after it are resources/lib.sh. ---",
             "# shellcheck disable=SC2034  # each script uses its own part of these"]
    lines += [f"{key}='{value}'" for key, value in names().items()]
    lines += ["", "# leanvm's name (amd64, arm64) for machine $1 as uname -m says it (Linux: x86_64 or",
              "# aarch64; macOS: x86_64 or arm64); the name itself for any other.",
              "arch_of_machine() {",
              '  case $1 in']
    lines += [f"    {facts.cpu_name}|{arch.value}) echo {arch.value} ;;" for arch, facts in FACTS.items()]
    lines += ['    *) echo "$1" ;;', "  esac", "}", "", ""]
    return "\n".join(lines)


def lib_sh() -> str:
    """out/lib.sh as doit installs it: the generated head, then resources/lib.sh."""
    return head() + SHELL_LIB.read_text().removeprefix("# shellcheck shell=sh\n")


def ask(function: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """lib.sh's `function ARGS`, run by sh: its exit status and what it printed."""
    script = 'die() { printf "%s\\n" "$*" >&2; exit 1; }\n' + lib_sh() + '\n"$@"\n'
    return subprocess.run(["sh", "-c", script, "lib.sh", function, *map(str, args)],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
