"""doit entry point: wiring only; the tasks live in the leanvm package (pipeline/leanvm/dag)."""

from pathlib import Path

from leanvm.dag.doitenv import set_defaults
from leanvm.dag.tasks import (  # noqa: F401  (doit discovers task_* by name)
    doit_config,
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

HERE = Path(__file__).resolve().parent
set_defaults(config=HERE / "configs" / "cluster.yaml", out=HERE / "out")
DOIT_CONFIG = doit_config()
