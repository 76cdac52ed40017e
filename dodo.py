"""doit entry point: wiring only; the tasks live in the leanvm package (pipeline/leanvm/dag).

doit runs them through leanvm's task loader, which pyproject.toml's [tool.doit] names, so
`doit` is run from this directory; from anywhere else, use the `leanvm` command.
"""

from pathlib import Path

from doit.exceptions import InvalidDodoFile
from leanvm.dag.doitenv import RUN, set_defaults
from leanvm.dag.tasks import (  # noqa: F401  (doit discovers task_* by name)
    task_bundle,
    task_cluster,
    task_configdrive,
    task_download,
    task_extract,
    task_launcher,
    task_libvirt,
    task_prune,
    task_reset,
    task_retire,
    task_rootfs,
    task_sshkey,
    task_verify,
)

if not RUN.loader_in_use:
    raise InvalidDodoFile("leanvm's dodo.py runs through leanvm's task loader, which its pyproject.toml names: "
                          "run doit in the leanvm checkout, or use the `leanvm` command from anywhere")
HERE = Path(__file__).resolve().parent
set_defaults(config=HERE / "configs" / "cluster.yaml", out=HERE / "out")
