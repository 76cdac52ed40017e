"""doit entry point: wiring only; the tasks live in pipeline/tasks.py."""

from pipeline.tasks import (  # noqa: F401  (doit discovers task_* by name)
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

DOIT_CONFIG = doit_config()
