"""A VM's Ignition config, checked at build time by the real validator (ignition-validate,
from Debian's ignition package: CoreOS Ignition 2.14), and Butane configs transpiled.

Flatcar's current Ignition accepts spec 3.0.0-3.5.0 and translates 2.x; 2.14's validator
knows 3.0.0-3.3.0, so a newer spec that Flatcar accepts is built with a note that it was
not validated, and a spec Flatcar does not know is an error.
"""

import json
import re
from pathlib import Path

from leanvm.errors import LeanvmError, note, warn
from leanvm.proc import run

FLATCAR_SPECS = ("2.0.0", "2.1.0", "2.2.0", "2.3.0", "3.0.0", "3.1.0", "3.2.0", "3.3.0", "3.4.0", "3.5.0")


def load(path: Path, is_butane: bool) -> dict:
    """The Ignition config in `path`; a Butane file is transpiled with `butane --strict`."""
    if is_butane:
        return json.loads(run(["butane", "--strict", path]).stdout)
    return json.loads(path.read_text())


def validate(vm: str, merged: Path, source: Path) -> None:
    """Run ignition-validate on VM vm's merged config; an error fails the build in one line,
    a warning becomes a `leanvm: warning:` line naming the VM."""
    result = run(["ignition-validate", merged], check=False)
    lines = (result.stdout + result.stderr).decode(errors="replace").strip().splitlines()
    where = f"VM {vm}: Ignition config {source}"
    if result.returncode == 0:
        for line in lines:
            warn(f"{where}: {line}")
        return
    if any("unsupported config version" in line for line in lines):
        version = str(json.loads(merged.read_text()).get("ignition", {}).get("version"))
        if version in FLATCAR_SPECS:
            why = ("older than the 3.x specs the installed ignition-validate checks" if version.startswith("2.")
                   else "newer than the installed ignition-validate knows")
            note(f"{where}: spec {version} is {why}: built without validation (Flatcar's Ignition accepts it)")
            return
        raise LeanvmError(f"{where}: spec version {version!r} is not one Flatcar's Ignition accepts",
                          "use 3.0.0 to 3.5.0 (the mini release's Ignition 2.14 boots 3.0.0 to 3.3.0)")
    detail = next((re.sub(r"^error", "Error", line) for line in lines if line.lower().startswith("error")),
                  lines[-1] if lines else f"exit code {result.returncode}")
    raise LeanvmError(f"{where}: {detail}", "fix the Ignition config")
