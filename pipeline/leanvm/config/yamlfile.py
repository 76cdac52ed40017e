"""Reading a YAML file: one line for a syntax error, and a key given twice is an error."""

from pathlib import Path
from typing import Any

import yaml

from leanvm.errors import LeanvmError


def yaml_problem(error: yaml.YAMLError) -> str:
    """'line N: PROBLEM' for a YAML error, as users see it in their editor."""
    mark = getattr(error, "problem_mark", None)
    line = f"line {mark.line + 1}: " if mark else ""
    return line + (getattr(error, "problem", None) or "invalid YAML")


class _DuplicateKey(yaml.MarkedYAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (YAML
    1.2 says keys are unique; PyYAML would keep the last one silently: two `vms:` blocks
    would drop every VM of the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[str, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: PyYAML says so itself
                continue
            if duplicate and key != "<<":
                raise _DuplicateKey(problem=f"key {key!r} appears twice (the second would replace the first)",
                                    problem_mark=key_node.start_mark)
        mapping: dict[str, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def read_yaml(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise LeanvmError(f"{path}: no such file", "check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LeanvmError(f"{path}: cannot read: {e}", "check the file") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except _DuplicateKey as e:
        raise LeanvmError(f"{path}: {yaml_problem(e)}", "keep one of them") from None
    except yaml.YAMLError as e:
        raise LeanvmError(f"{path}: YAML syntax error: {yaml_problem(e)}", "fix the YAML") from None


