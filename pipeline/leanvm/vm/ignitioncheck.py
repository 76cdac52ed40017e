"""A VM's Ignition config, checked at build time by the real validator (ignition-validate,
from Debian's ignition package: CoreOS Ignition 2.14), and Butane configs transpiled.

Which specs a VM's release accepts is its profile's `ignition_specs` (check_spec); 2.14's
validator knows 3.0.0-3.3.0, so a newer spec that the release accepts is built with a note
that it was not validated.
"""

import json
import re
from pathlib import Path
from typing import Any

from leanvm.config.types import Release, accepted_specs, spec_ranges
from leanvm.errors import LeanvmError, note, warn
from leanvm.proc import run


def transpile(path: Path) -> dict[str, Any]:
    """The Ignition config that the Butane config in `path` becomes (`butane --strict`)."""
    transpiled: dict[str, Any] = json.loads(run(["butane", "--strict", path]).stdout)
    return transpiled


def check_spec(vm: str, source: Path, config: dict[str, Any], release: Release, version: str) -> None:
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
    errors = [line for line in lines if line.lower().startswith("error")]
    flatcar_only = [e for e in errors if _is_oem_url_error(e, json.loads(merged.read_text()))]
    if errors and flatcar_only == errors:
        for error in errors:
            warn(f"{where}: an oem:// URL ({error.split(',')[0].removeprefix('Error at ')}): Flatcar's Ignition "
                 "reads it from the OEM partition; the installed (upstream) ignition-validate does not know the "
                 "scheme, so the rest of the config was not validated (the mini release's Ignition fails on it)")
        return
    detail = re.sub(r"^error", "Error", errors[0]) if errors else (lines[-1] if lines else f"exit {result.returncode}")
    raise LeanvmError(f"{where}: {detail}", "fix the Ignition config")


def _is_oem_url_error(error: str, config: dict[str, Any]) -> bool:
    """An 'invalid url scheme' error at a value that is an oem:// URL: a scheme upstream's spec 3
    dropped and Flatcar's Ignition brings back (flatcar/scripts sys-apps/ignition/files/
    0013-Revert-drop-OEM-URI-support.patch, branch flatcar-4593)."""
    match = re.match(r"error at \$\.([\w.]+), .*invalid url scheme", error, re.I)
    if not match:
        return False
    value: object = config
    for part in match.group(1).split("."):
        try:
            value = value[int(part)] if isinstance(value, list) else value[part]  # type: ignore[index]
        except (KeyError, IndexError, ValueError, TypeError):
            return False
    return isinstance(value, str) and value.startswith("oem://")
