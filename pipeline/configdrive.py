"""The config drive's user_data: the VM's own file, or a generated #cloud-config."""

from pathlib import Path

import yaml

from .config import VM
from .errors import LeanvmError
from .fsutil import write_atomic

CLOUD_CONFIG = "#cloud-config"


def _merge_keys(doc: dict, keys: tuple[str, ...]) -> dict:
    merged = list(doc.get("ssh_authorized_keys") or [])
    merged += [k for k in keys if k not in merged]
    return {**doc, "ssh_authorized_keys": merged}


def _dump(doc: dict) -> str:
    return CLOUD_CONFIG + "\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def _from_file(path: Path, keys: tuple[str, ...]) -> str:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise LeanvmError(f"{path}: cannot read user_data: {e}", "check the file") from None
    if text.startswith("#!"):
        if keys:
            raise LeanvmError(
                f"{path}: ssh_authorized_keys cannot be merged into a '#!' script",
                "put the keys in the script, or use a #cloud-config file",
            )
        return text
    if not text.startswith(CLOUD_CONFIG):
        raise LeanvmError(f"{path}: user_data is neither '#cloud-config' nor a '#!' script", "fix its first line")
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark else ""
        raise LeanvmError(f"{path}: {line}#cloud-config is not valid YAML", "fix the YAML") from None
    if doc is not None and not isinstance(doc, dict):
        raise LeanvmError(f"{path}: #cloud-config must be a YAML mapping", "write KEY: VALUE lines")
    if not keys:
        return text
    return _dump(_merge_keys(doc or {}, keys))


def render(vm: VM) -> str:
    if vm.user_data is not None:
        return _from_file(vm.user_data, vm.ssh_authorized_keys)
    doc: dict = {"hostname": vm.name}
    if vm.ssh_authorized_keys:
        doc = _merge_keys(doc, vm.ssh_authorized_keys)
    return _dump(doc)


def write(vm: VM, dest: Path) -> None:
    write_atomic(dest, render(vm).encode())
