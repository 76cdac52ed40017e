"""In process: the cluster file is only read; the DAG gives each VM its identity, which is
kept across builds; the config drive merges keys, the network unit and /etc/hosts; the
launcher takes everything from the VM's values file."""

import socket
from pathlib import Path

import pytest
import yaml
from leanvm.config.load import load_cluster
from leanvm.dag.tasks import assign_identities
from leanvm.errors import LeanvmError
from leanvm.ship import runtime
from leanvm.state import identity
from leanvm.vm import configdrive, values
from support import Project, printed


def never_in_use(port: int) -> bool:
    return False


def test_loading_a_cluster_file_assigns_nothing(project: Project):
    project.write_cluster({"a": {"ssh_port": 2400}, "b": {"cluster_ip": "10.77.0.20"}})
    cluster = load_cluster(project.cluster_file)
    assert cluster.vms[0].given_ssh_port == 2400 and cluster.vms[1].given_cluster_ip == "10.77.0.20"
    assert cluster.vms[1].given_ssh_port is None and not cluster.vms[0].cluster_ip_given
    assert not any(hasattr(vm, attr) for vm in cluster.vms for attr in ("identity", "ssh_port", "mac"))


def test_config_imports_nothing_from_state():
    """The identities live beside the VMs (the DAG's map), not in config's types."""
    import ast

    import leanvm.config

    for path in Path(leanvm.config.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith("leanvm.state"), (path, node.module)
            elif isinstance(node, ast.Import):
                assert not any(a.name.startswith("leanvm.state") for a in node.names), path


def test_identities_keep_what_was_given_and_what_was_assigned(project: Project):
    project.write_cluster({"a": {"ssh_port": 2400}, "b": {"cluster_ip": "10.77.0.20"}})
    first = assign_identities(load_cluster(project.cluster_file), {}, {2401}, never_in_use)
    assert list(first) == ["a", "b"]
    a, b = first["a"], first["b"]
    assert a.ssh_port == 2400 and a.host_ports == (2400,)
    assert b.cluster_ip == "10.77.0.20/24" and b.ssh_port not in (2400, 2401)
    assert a.mac.startswith("52:54:00:") and a.cluster_mac.startswith("52:54:01:") and a.mac != b.mac
    project.write_cluster({"a": {"ssh_port": 2400}, "b": {"cluster_ip": "10.77.0.20"}, "c": {}})
    again = assign_identities(load_cluster(project.cluster_file), first, set(), lambda port: port == b.ssh_port)
    assert [again["a"], again["b"]] == [a, b]  # a taken port never moves a VM
    c = again["c"]
    assert c.ssh_port not in (a.ssh_port, b.ssh_port) and c.cluster_ip not in (a.cluster_ip, b.cluster_ip)


def test_a_subnet_too_small_for_its_vms_is_one_line_naming_the_key(project: Project):
    project.write_cluster({f"v{i}": {} for i in range(3)}, network={"subnet": "10.77.0.0/30"})
    with pytest.raises(LeanvmError, match=r"cluster.yaml: network.subnet: .*; use a larger subnet"):
        assign_identities(load_cluster(project.cluster_file), {}, set(), never_in_use)


def test_the_config_drive_merges_keys_the_network_unit_and_hosts(project: Project):
    (project.root / "u.yaml").write_text("#cloud-config\nssh_authorized_keys: [mine]\nwrite_files:\n"
                                         "- path: /etc/motd\n  content: hi\n")
    project.write_cluster({"a": {"user_data": "u.yaml"}, "b": {}})
    cluster = load_cluster(project.cluster_file)
    given = assign_identities(cluster, {}, set(), never_in_use)
    a = cluster.vms[0]
    doc = yaml.safe_load(configdrive.render(a, given["a"], "cluster-key", configdrive.hosts(given)))
    assert doc["ssh_authorized_keys"] == ["mine", "cluster-key"]
    (unit,) = doc["coreos"]["units"]
    assert unit["name"] == "50-leanvm-cluster.network" and f"MACAddress={given['a'].cluster_mac}" in unit["content"]
    motd, hosts, *drop_ins = doc["write_files"]
    assert [f["path"] for f in drop_ins] == list(configdrive.DROP_INS)
    assert motd["path"] == "/etc/motd" and hosts["path"] == "/etc/hosts"
    assert f"{given['b'].cluster_ip.split('/')[0]} b" in hosts["content"]
    (project.root / "u.yaml").write_text("#cloud-config\nwrite_files:\n- path: /etc/hosts\n  content: mine\n")
    a = load_cluster(project.cluster_file).vms[0]  # the loader reads user_data once: load it again
    doc = yaml.safe_load(configdrive.render(a, given["a"], None, configdrive.hosts(given)))
    assert doc["write_files"][0] == {"path": "/etc/hosts", "content": "mine"}  # the user's own wins
    assert [f["path"] for f in doc["write_files"][1:]] == list(configdrive.DROP_INS)


def test_the_identity_file_is_sh_that_python_reads_back(tmp_path):
    import subprocess

    from leanvm.state import identity
    from leanvm.state.layout import Layout

    given = identity.Identity(2222, "52:54:00:aa:bb:cc", "52:54:01:aa:bb:cc", "10.77.0.11/24", (2222, 8080),
                              "images/it's here/1.0")  # a quote and a space: quoting must hold
    identity.save(tmp_path, "core1", {**identity.as_values(given), "kernel_args": "a='b c' $HOME `x`"})
    assert identity.load(tmp_path) == {"core1": given}
    script = '. "$1" && printf "%s|%s|%s|%s" "$ssh_port" "$host_ports" "$image_dir" "$kernel_args"'
    sourced = subprocess.run(["sh", "-c", script, "sh", str(Layout(tmp_path).values("core1"))],
                             capture_output=True, text=True, check=True)
    assert sourced.stdout == "2222|2222 8080|images/it's here/1.0|a='b c' $HOME `x`"


def test_run_sh_takes_everything_from_the_values_file(project: Project, tmp_path):
    project.write_profile("http://127.0.0.1:9/", ignition_fw_cfg="opt/test/config")  # nothing is fetched
    (project.root / "a.ign").write_text('{"ignition": {"version": "3.3.0"}}')
    project.write_cluster({"a": {"forward": ["18080:80"], "ignition": "a.ign", "cpus": 2, "memory": 384},
                           "c": {"kernel_args": "quiet"}})
    cluster = load_cluster(project.cluster_file)
    given = assign_identities(cluster, {}, set(), never_in_use)
    out = tmp_path / "o,ut"  # a comma: QEMU's option separator, doubled in paths
    for vm in cluster.vms:
        values.write(vm, given[vm.name], "9.9", out)
    runtime.write(out / "leanvm-runtime.pyz")
    a, c = (printed(out / "vms" / vm.name / "run.sh", {"LEANVM_ACCEL": "tcg"}) for vm in cluster.vms)
    vm_a = given["a"]
    assert a[a.index("-smp") + 1] == "2" and a[a.index("-m") + 1] == "384" and a[a.index("-name") + 1] == "a"
    assert a[a.index("-netdev") + 1] == (f"user,id=net0,hostfwd=tcp:127.0.0.1:{vm_a.ssh_port}-:22,"
                                         "hostfwd=tcp:127.0.0.1:18080-:80,hostname=a")
    assert a[a.index("-fw_cfg") + 1] == f"name=opt/test/config,file={str(out).replace(',', ',,')}/vms/a/ignition.json"
    assert a[a.index("-kernel") + 1] == f"{out}/images/test/9.9/vmlinuz"
    assert "-fw_cfg" not in c and c[c.index("-append") + 1].endswith(" quiet")
    assert a[a.index("-machine") + 1] == "q35" and a[a.index("-accel") + 1] == "tcg" and a[a.index("-cpu") + 1] == "max"


def test_a_port_is_taken_by_a_listener_on_any_address():
    """One rule for run.sh's refusal and doit's port choice: leanvm.host's port_in_use (a listener
    on any address)."""
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))
        port = listener.getsockname()[1]
        listener.listen()
        assert identity.port_in_use(port)
    assert not identity.port_in_use(port)
