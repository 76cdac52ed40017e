"""Bad configs: non-zero exit, one line naming the file and the key, no traceback."""

from pathlib import Path

import pytest
import yaml
from leanvm.config.load import load_cluster
from leanvm.errors import LeanvmError
from support import Project

CLUSTER_CASES = {
    "unknown top-level key": ({"release": "test", "vms": {"a": {}}, "extra": 1}, "cluster.yaml: extra"),
    "unknown VM key": ({"release": "test", "vms": {"a": {"memroy": 512}}}, "vms.a.memroy"),
    "unknown defaults key": ({"release": "test", "defaults": {"cpu": 2}, "vms": {"a": {}}}, "defaults.cpu"),
    "wrong type memory": ({"release": "test", "vms": {"a": {"memory": "lots"}}}, "vms.a.memory"),
    "memory too small": ({"release": "test", "vms": {"a": {"memory": 64}}}, "vms.a.memory"),
    "zero cpus": ({"release": "test", "vms": {"a": {"cpus": 0}}}, "vms.a.cpus"),
    "bad VM name upper": ({"release": "test", "vms": {"Core1": {}}}, "vms.Core1"),
    "VM name with slash": ({"release": "test", "vms": {"a/b": {}}}, "vms.a/b"),
    "VM name with dots": ({"release": "test", "vms": {"..": {}}}, "vms..."),
    "VM name with shell chars": ({"release": "test", "vms": {"a;rm": {}}}, "vms.a;rm"),
    "duplicate port": ({"release": "test", "vms": {"a": {"ssh_port": 2222}, "b": {"ssh_port": 2222}}}, "ssh_port"),
    "port out of range": ({"release": "test", "vms": {"a": {"ssh_port": 70000}}}, "vms.a.ssh_port"),
    "privileged port": ({"release": "test", "vms": {"a": {"ssh_port": 22}}}, "vms.a.ssh_port"),
    "port as a default": ({"release": "test", "defaults": {"ssh_port": 2400}, "vms": {"a": {}}}, "defaults.ssh_port"),
    "missing profile": ({"release": "nope", "vms": {"a": {}}}, "release"),
    "unparseable size": ({"release": "test", "vms": {"a": {"disk": "4 gigs"}}}, "vms.a.disk"),
    "negative size": ({"release": "test", "vms": {"a": {"disk": "-4G"}}}, "vms.a.disk"),
    "size too small": ({"release": "test", "vms": {"a": {"disk": "1M"}}}, "vms.a.disk"),
    "no vms": ({"release": "test"}, "vms"),
    "user_data missing": ({"release": "test", "vms": {"a": {"user_data": "nope.yaml"}}}, "vms.a.user_data"),
    "user_data is a directory": ({"release": "test", "vms": {"a": {"user_data": "."}}}, "vms.a.user_data"),
    "ssh_port not a number": ({"release": "test", "vms": {"a": {"ssh_port": "22x"}}}, "vms.a.ssh_port"),
    "vms is a list": ({"release": "test", "vms": ["a", "b"]}, "vms"),
    "keys not a list": ({"release": "test", "vms": {"a": {"ssh_authorized_keys": "ssh-ed25519 A"}}},
                        "vms.a.ssh_authorized_keys"),
}

PROFILE_CASES = {
    "bad URL scheme": ({"base_url": "ftp://example.org/"}, "base_url"),
    "fingerprint malformed": ({"fingerprints": ["F88CFEDE"]}, "fingerprints.0"),
    "empty fingerprint list": ({"fingerprints": []}, "fingerprints"),
    "unknown profile key": ({"kernal": "x"}, "kernal"),
    "missing profile field": ({"kernel": None}, "kernel"),
    "key file missing": ({"signing_key": "nope.asc"}, "signing_key"),
    "key file holds no key": ({"signing_key": "test.yaml"}, "signing_key"),
    "version not a string": ({"version": ["1"]}, "version"),
    "kernel not a file name": ({"kernel": "../../etc/passwd"}, "kernel"),
}


def _assert_one_line_error(project: Project, file_part: str, key_part: str) -> None:
    before = sorted(p.relative_to(project.out) for p in project.out.rglob("*"))
    result = project.doit()
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert file_part in lines[0] and key_part in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(p.relative_to(project.out) for p in project.out.rglob("*")) == before


@pytest.fixture
def built(project: Project) -> Project:
    assert project.doit().returncode == 0
    return project


def _load_error(cluster_file: Path) -> str:
    """The one-line message load_cluster gives (in-process: milliseconds a case)."""
    with pytest.raises(LeanvmError) as error:
        load_cluster(cluster_file)
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("case", sorted(CLUSTER_CASES))
def test_bad_cluster_file(project: Project, case: str):
    doc, key = CLUSTER_CASES[case]
    project.cluster_file.write_text(yaml.safe_dump(doc))
    message = _load_error(project.cluster_file)
    assert str(project.cluster_file) in message and key in message, message


@pytest.mark.parametrize("case", sorted(PROFILE_CASES))
def test_bad_profile(project: Project, server, case: str):
    overrides, key = PROFILE_CASES[case]
    project.write_profile(**{"base_url": server.url, **overrides})
    if overrides.get("kernel", "") is None:
        doc = yaml.safe_load(project.profile_file.read_text())
        del doc["kernel"]
        project.profile_file.write_text(yaml.safe_dump(doc))
    message = _load_error(project.cluster_file)
    assert "test.yaml" in message and key in message, message


def test_a_bad_cluster_file_is_one_stderr_line_and_leaves_out_untouched(built: Project):
    built.cluster_file.write_text(yaml.safe_dump(CLUSTER_CASES["duplicate port"][0]))
    _assert_one_line_error(built, "cluster.yaml", "ssh_port")


def test_a_bad_profile_is_one_stderr_line_and_leaves_out_untouched(built: Project, server):
    built.write_profile(server.url, fingerprints=["F88CFEDE"])
    _assert_one_line_error(built, "test.yaml", "fingerprints.0")


def test_yaml_syntax_error_names_line(built: Project):
    built.cluster_file.write_text("release: test\nvms:\n  a: {\n  b: [\n")
    _assert_one_line_error(built, "cluster.yaml", "line ")


def test_unreadable_user_data_content(built: Project):
    (built.root / "bad.txt").write_text("just some text\n")
    built.write_cluster({"core1": {"ssh_port": 2222, "user_data": "bad.txt"}})
    result = built.doit()
    assert result.returncode != 0
    assert "bad.txt" in result.stderr and "cloud-config" in result.stderr
    assert "vms.core1.user_data" in result.stderr and result.returncode == 2  # found when loading, like any key
    assert len(result.stderr.strip().splitlines()) == 1


def test_invalid_cloud_config_yaml(built: Project):
    (built.root / "cc.yaml").write_text("#cloud-config\nhostname: [oops\n")
    built.write_cluster({"core1": {"ssh_port": 2222, "user_data": "cc.yaml"}})
    result = built.doit()
    assert result.returncode != 0
    assert "cc.yaml" in result.stderr and "YAML" in result.stderr and "vms.core1.user_data" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_script_user_data_with_keys_is_refused_when_loading(built: Project):
    (built.root / "boot.sh").write_text("#!/bin/sh\necho hi\n")
    built.write_cluster({"core1": {"user_data": "boot.sh", "ssh_authorized_keys": ["ssh-ed25519 AAAA me"]}})
    result = built.doit()
    assert result.returncode == 2 and "vms.core1.user_data" in result.stderr and "'#!' script" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # without keys or a given address a script is used as it is
    built.write_cluster({"core1": {"user_data": "boot.sh"}})
    assert built.doit().returncode == 0
    assert (built.vm("core1") / "config/openstack/latest/user_data").read_text() == "#!/bin/sh\necho hi\n"


def test_info_on_an_unknown_task_is_one_line(built: Project):
    result = built.doit("info", "nosuch")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "leanvm: error: no task named 'nosuch'; see the task names with `doit list --all`"]


@pytest.mark.parametrize("text, words", [
    ('#cloud-config\nhostname: "héllo-wörld"\n', ["hostname 'héllo-wörld' is not a hostname systemd accepts"]),
    ("#cloud-config\nhostname: bad..dots\n", ["hostname 'bad..dots'"]),
    ("#cloud-config\nhostname: " + "a" * 65 + "\n", ["at most 64 characters"]),
    ('#cloud-config\nwrite_files:\n  - path: /etc/grüße\n    content: hi\n',
     ["write_files path '/etc/grüße' is not ASCII"]),
], ids=["non-ascii-hostname", "empty-label", "too-long", "non-ascii-path"])
def test_names_the_guest_would_mangle_are_refused_at_build_time(built: Project, text: str, words: list[str]):
    (built.root / "cc.yaml").write_text(text)
    built.write_cluster({"core1": {"ssh_port": 2222, "user_data": "cc.yaml"}})
    result = built.doit()
    assert result.returncode == 2 and "cc.yaml" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for word in words:
        assert word in result.stderr
