"""A private rootless cluster network, port safety, Ignition, cluster.sh up/down."""

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
import yaml
from leanvm.vm.configdrive import DROP_INS
from support import ENV, build_cluster, doit, marker, qemu_pids, run, sh, wait_for_text


def test_up_status_network_ping_and_down(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {
        "node-a": {"cluster_ip": "10.77.0.11", "ssh_port": 2511},
        "node-b": {"cluster_ip": "10.77.0.12", "ssh_port": 2512},
    })
    cluster_sh = str(out / "cluster.sh")
    subprocess.run(["shellcheck", cluster_sh], check=True)
    env = {**ENV, "LEANVM_APPEND": "leanvm.hold leanvm.ping=10.77.0.11,10.77.0.12", "LEANVM_STOP_TIMEOUT": "60"}
    try:
        up = run([cluster_sh, "up"], capture_output=True, text=True, env=env, timeout=60)
        assert up.returncode == 0, up.stdout + up.stderr
        assert "node-a: started" in up.stdout and "ssh 127.0.0.1:2512" in up.stdout
        status = subprocess.run([cluster_sh, "status"], capture_output=True, text=True, check=True).stdout
        assert re.search(r"node-a\s+running\s+\d+\s+127.0.0.1:2511", status), status
        assert re.search(r"node-b\s+running\s+\d+\s+127.0.0.1:2512", status), status
        for name, own, peer in (("node-a", "10.77.0.11", "10.77.0.12"), ("node-b", "10.77.0.12", "10.77.0.11")):
            console = wait_for_text(out / "vms" / name / "console.log", "holding (leanvm.hold)")
            assert f"leanvm: cluster network: eth1 {own}/24" in console
            assert f"leanvm: ping {peer}: ok" in console, console[-2000:]
            assert marker(console, "hostname") == name
    finally:
        down = run([cluster_sh, "down"], capture_output=True, text=True, env=env, timeout=120)
    assert down.returncode == 0, down.stderr
    assert "did not power off" not in down.stdout  # graceful: ACPI power button, guest powers off
    for name in ("node-a", "node-b"):
        console = (out / "vms" / name / "console.log").read_text(errors="replace")
        assert "leanvm: power button pressed" in console and "leanvm: powering off" in console
    assert qemu_pids(out) == []
    status = subprocess.run([cluster_sh, "status"], capture_output=True, text=True, check=True).stdout
    assert "running" not in status


def test_up_and_down_of_named_vms_and_one_line_for_what_cannot_be_done(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"a": {}, "b": {}})
    cluster_sh = str(out / "cluster.sh")
    env = {**ENV, "LEANVM_STOP_TIMEOUT": "1"}

    def cluster(*args: str) -> subprocess.CompletedProcess:
        return run([cluster_sh, *args], capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120)

    def one_line(result: subprocess.CompletedProcess) -> str:
        (line,) = result.stderr.strip().splitlines()
        assert result.returncode != 0
        return line

    assert "unknown command 'bogus': see" in one_line(cluster("bogus"))
    assert "no VM named 'nosuch'" in one_line(cluster("up", "a", "nosuch")) and qemu_pids(out) == []
    try:
        up = cluster("up", "a")
        assert up.returncode == 0 and "a: started" in up.stdout and "b:" not in up.stdout, up.stderr
        status = cluster("status").stdout
        assert re.search(r"^a\s+running\s+\d+", status, re.M) and re.search(r"^b\s+stopped", status, re.M), status
        assert f"VM b is not running: start it with {cluster_sh} up b" in one_line(cluster("ssh", "b", "--", "true"))
        down = cluster("down", "b")  # b is not running: a is left alone
        assert down.returncode == 0 and re.search(r"^a\s+running", cluster("status").stdout, re.M)
    finally:
        down = cluster("down", "a")
    assert down.returncode == 0 and "a: stopped" in down.stdout and "b:" not in down.stdout, down.stdout
    assert qemu_pids(out) == []


def test_port_taken_on_host_is_one_clear_line(mini: Path, tmp_path: Path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = build_cluster(tmp_path, mini / "mini.yaml", {"web": {"ssh_port": 2521, "forward": [f"{port}:80"]}})
        result = run([str(out / "vms" / "web" / "run.sh")], capture_output=True, text=True, env=ENV,
                     stdin=subprocess.DEVNULL, timeout=30)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"VM web: host port {port}" in lines[0] and "already in use" in lines[0]
    assert f"hostfwd=tcp:127.0.0.1:{port}-:80" in sh(str(out / "vms" / "web" / "run.sh"), "--print").decode()


def test_generated_cloud_config_carries_the_cluster_address(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"one": {"cluster_ip": "10.9.0.5"}},
                        network={"subnet": "10.9.0.0/16"})
    doc = yaml.safe_load((out / "vms" / "one" / "config/openstack/latest/user_data").read_text())
    # the unit is not in write_files (coreos-cloudinit would not restart networkd for it)
    assert [f["path"] for f in doc["write_files"]] == ["/etc/hosts", *DROP_INS]
    assert "10.9.0.5 one" in doc["write_files"][0]["content"]
    (unit,) = doc["coreos"]["units"]
    assert unit["name"] == "50-leanvm-cluster.network"
    mac = re.search(r"mac=(52:54:01:[0-9a-f:]+)", sh(str(out / "vms" / "one" / "run.sh"), "--print").decode())[1]
    assert f"MACAddress={mac}" in unit["content"] and "Address=10.9.0.5/16" in unit["content"]


@pytest.mark.parametrize("vms, extra, key", [
    ({"a": {"cluster_ip": "10.78.0.1"}}, {}, "vms.a.cluster_ip"),
    ({"a": {"cluster_ip": "10.77.0.5"}, "b": {"cluster_ip": "10.77.0.5"}}, {}, "vms.b.cluster_ip"),
    ({"a": {"forward": ["80"]}}, {}, "vms.a.forward.0"),
    ({"a": {"ssh_port": 2600}, "b": {"forward": ["2600:80"]}}, {}, "vms.b.forward"),
    ({"a": {"ignition": "nope.ign"}}, {}, "vms.a.ignition"),
    ({"a": {"ignition": "bad.ign"}}, {}, "vms.a.ignition"),
    ({"a": {"ignition": "ok.ign", "user_data": "ok.ign"}}, {}, "vms.a"),
    ({"a": {}}, {"network": {"subnet": "10.77.0.0/33"}}, "network.subnet"),
    ({"a": {}}, {"network": {"mtu": 9000}}, "network.mtu"),
])
def test_bad_cluster_settings(mini: Path, tmp_path: Path, vms: dict, extra: dict, key: str):
    (tmp_path / "bad.ign").write_text('{"storage": {}}')
    (tmp_path / "ok.ign").write_text('{"ignition": {"version": "3.4.0"}}')
    doc = {"release": str(mini / "mini.yaml"), "vms": vms, **extra}
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(doc))
    result = doit(f"config={tmp_path / 'cluster.yaml'}", f"out={tmp_path / 'out'}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cluster.yaml" in lines[0] and key in lines[0], lines


def test_cluster_script_is_installed_once_and_relocatable(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"x": {}, "y": {}})
    moved = tmp_path / "moved"
    sh("cp", "-a", "--sparse=always", out, moved)
    status = subprocess.run([str(moved / "cluster.sh"), "status"], capture_output=True, text=True, check=True)
    assert re.search(r"^x\s+stopped", status.stdout, re.M) and re.search(r"^y\s+stopped", status.stdout, re.M)
    bad = subprocess.run([str(moved / "cluster.sh"), "console", "nope"], capture_output=True, text=True)
    assert bad.returncode != 0 and "no VM named 'nope'" in bad.stderr
    assert os.access(moved / "cluster.sh", os.X_OK)


@pytest.mark.slow  # ~17 s: in CI's slow run (the main suite stays under its 10 minutes)
def test_down_stops_a_guest_that_ignores_the_power_button(mini: Path, tmp_path: Path):
    out = build_cluster(tmp_path, mini / "mini.yaml", {"stubborn": {}})
    cluster_sh = str(out / "cluster.sh")
    # leanvm.shell with no terminal: the guest sits in a shell and never reads the button.
    env = {**ENV, "LEANVM_APPEND": "leanvm.shell", "LEANVM_STOP_TIMEOUT": "2"}
    try:
        assert run([cluster_sh, "up"], capture_output=True, env=env, timeout=60).returncode == 0
        wait_for_text(out / "vms" / "stubborn" / "console.log", "shell requested")
    finally:
        down = run([cluster_sh, "down"], capture_output=True, text=True, env=env, timeout=120)
    assert "stubborn: did not power off within 2s; stopping QEMU" in down.stdout
    assert qemu_pids(out) == []


@pytest.mark.slow  # ~50 s: in CI's slow run, keeping the main suite under its 10 minutes
def test_two_clusters_coexist_with_distinct_ports_and_isolated_networks(mini: Path, tmp_path: Path):
    # Both clusters have a core1 with an assigned port; B's core1 sits on A's subnet address
    # range, so only the separate switches keep the two apart.
    a = build_cluster(tmp_path / "a", mini / "mini.yaml", {"core1": {"cluster_ip": "10.77.0.11"},
                                                   "core2": {"cluster_ip": "10.77.0.12"}})
    b = build_cluster(tmp_path / "b", mini / "mini.yaml", {"core1": {"cluster_ip": "10.77.0.13"}})
    port_a = (a / "state" / "vms" / "core1.env").read_text()
    port_b = (b / "state" / "vms" / "core1.env").read_text()
    assert re.search(r"^ssh_port=(\d+)$", port_a, re.M)[1] != re.search(r"^ssh_port=(\d+)$", port_b, re.M)[1]
    hold = {**ENV, "LEANVM_APPEND": "leanvm.hold"}
    check = {**ENV, "LEANVM_APPEND": "leanvm.hold leanvm.ping=10.77.0.11,10.77.0.12 leanvm.unreachable=10.77.0.13"}
    try:
        up_b = run([str(b / "cluster.sh"), "up"], capture_output=True, text=True, env=hold, timeout=60)
        assert up_b.returncode == 0, up_b.stdout + up_b.stderr
        wait_for_text(b / "vms" / "core1" / "console.log", "holding (leanvm.hold)")
        up_a = run([str(a / "cluster.sh"), "up"], capture_output=True, text=True, env=check, timeout=60)
        assert up_a.returncode == 0, up_a.stdout + up_a.stderr
        for name in ("core1", "core2"):
            console = wait_for_text(a / "vms" / name / "console.log", "holding (leanvm.hold)", timeout=180)
            assert "leanvm: ping 10.77.0.11: ok" in console and "leanvm: ping 10.77.0.12: ok" in console
            assert "leanvm: unreachable 10.77.0.13: yes" in console, console[-2000:]
        assert qemu_pids(b)  # B was up all along: its VM just is not on A's network
    finally:
        for out in (a, b):
            run([str(out / "cluster.sh"), "down"], capture_output=True, env=ENV, timeout=120)
    assert qemu_pids(a) == [] and qemu_pids(b) == []


def test_two_checkouts_build_the_demo_with_different_ports(mini: Path, tmp_path: Path):
    """The demo's cluster file pins no host port: a second checkout's demo gets its own."""
    demo = yaml.safe_load((Path(__file__).parent.parent / "configs" / "demo.yaml").read_text())
    assert not [vm for vm in demo["vms"].values() if vm and ("ssh_port" in vm or "forward" in vm)]
    ports = []
    for checkout in ("one", "two"):
        out = build_cluster(tmp_path / checkout, mini / "mini.yaml", {name: {} for name in demo["vms"]})
        ports.append(re.search(r"^ssh_port=(\d+)$", (out / "state/vms/demo1.env").read_text(), re.M)[1])
    assert ports[0] != ports[1]
