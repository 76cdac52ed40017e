"""Shared test support, one module per job: procs (running commands), mirror (a signed release
mirror on loopback), doit (running the DAG, a project directory), vm (building, booting and
watching VMs), hosts (libvirtd, an ssh host). Test modules import from here, never from each
other."""

from .doit import DOIT_CWD, DoitResult, Project, doit, doit_argv  # noqa: F401
from .hosts import (  # noqa: F401
    LIBVIRT_URI,
    free_port,
    libvirt_answers,
    rendered_domain,
    start_libvirtd,
    start_ssh_host,
    stop_daemons,
    virsh,
)
from .mirror import IMAGE, KERNEL, Keyring, Mirror, MirrorServer, make_cpio_gz, make_squashfs, newc, serve  # noqa: F401
from .procs import PROJECT, finish, processes, run, sh, slow_mkfs, stand_in_qemu, start  # noqa: F401
from .vm import (  # noqa: F401
    BOOT_TIMEOUT,
    ENV,
    HOLD,
    QUIT,
    boot,
    build_cluster,
    cluster_sh,
    copy_cluster,
    marker,
    on_vm,
    paths_in,
    printed,
    process_memory,
    qemu_pids,
    switch_processes,
    usr_partition,
    wait_for_text,
)
