"""A VM's Ignition config, checked at build time by the real validator (ignition-validate,
from Debian's ignition package: CoreOS Ignition 2.14), and Butane configs transpiled.

Which specs a VM's release accepts is its profile's `ignition_specs` (check_spec); 2.14's
validator knows 3.0.0-3.3.0, so a newer spec that the release accepts is built with a note
that it was not validated.
"""

import json
import re
from pathlib import Path

from leanvm.config.cluster import Release, accepted_specs, spec_ranges
from leanvm.errors import LeanvmError, note, warn
from leanvm.proc import run


def load(path: Path, is_butane: bool) -> dict:
    """The Ignition config in `path`; a Butane file is transpiled with `butane --strict`."""
    if is_butane:
        return json.loads(run(["butane", "--strict", path]).stdout)
    return json.loads(path.read_text())


def check_spec(vm: str, source: Path, config: dict, release: Release, version: str) -> None:
    """The config's spec is one that release's Ignition accepts (its profile's ignition_specs),
    and a spec 3 one: leanvm adds the cluster key, network unit and /etc/hosts as spec 3
    entries (storage.files without `filesystem`), which Flatcar's 2.x parser rejects
    (flatcar/ignition config/v2_4/types/node.go): such a boot ends in the emergency shell."""
    spec = str(config.get("ignition", {}).get("version"))
    accepted = accepted_specs(release, version) or ()
    where = f"VM {vm}: Ignition config {source}"
    if spec not in accepted:
        raise LeanvmError(f"{where}: spec {spec} is not one that release {release.name} {version} accepts "
                          f"({spec_ranges(accepted) or 'none'})",
                          "write the config for one of those specs, or give the VM a release that takes it")
    if spec.startswith("2."):
        raise LeanvmError(f"{where}: spec {spec} (2.x): leanvm adds its key, cluster network unit and /etc/hosts "
                          "as spec 3 entries, which Flatcar's 2.x parser would reject",
                          "move the config to spec 3 (ign-converter translates 2.x to 3.x; Butane writes 3.x)")


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
    if any("unsupported config version" in line for line in lines):  # its release accepts it (check_spec)
        version = str(json.loads(merged.read_text()).get("ignition", {}).get("version"))
        note(f"{where}: spec {version} is newer than the installed ignition-validate knows: built without "
             "validation (the release's Ignition accepts it)")
        return
    detail = next((re.sub(r"^error", "Error", line) for line in lines if line.lower().startswith("error")),
                  lines[-1] if lines else f"exit code {result.returncode}")
    raise LeanvmError(f"{where}: {detail}", "fix the Ignition config")
