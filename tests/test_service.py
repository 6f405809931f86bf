"""`fedmq service install` writes units systemd accepts and configs a sandboxed service can use."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

from edge_agent.config import AgentConfig
from fedmq.cli import main
from fedmq.configfile import ConfigError, load_config
from fedmq.service import UnitOptions, memory_budget_from, parse_memory, render_unit
from tests.federation import REPO, write_yaml

EXEC = f"{sys.executable} -m fedmq"  # a real executable, as systemd-analyze verify checks ExecStart


def systemd_verify(unit_path) -> subprocess.CompletedProcess:
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd; scripts/install.sh --broker)")
    return subprocess.run([exe, "verify", "--man=no", str(unit_path)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def agent_yaml(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.jsonl", "eval.jsonl"):
        (data / name).write_text('{"prompt": "2+2?", "response": "4"}\n')
        (data / name).chmod(0o644)
    pw = tmp_path / "agent.password"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    return write_yaml(tmp_path / "agent.yaml", {
        "device_id": "jetson-07",
        "broker": {"url": "mqtt://10.0.0.5:1883", "username": "jetson-07", "password_file": str(pw)},
        "model": "smollm2-135m",
        "method": "qlora",
        "data": {"train": str(data / "train.jsonl"), "eval": str(data / "eval.jsonl")},
        "state_dir": str(tmp_path / "somewhere"),
    })


def test_install_agent_writes_a_unit_systemd_accepts(tmp_path, agent_yaml, capsys):
    root = tmp_path / "root"
    rc = main(["service", "install", "agent", "--config", str(agent_yaml), "--root", str(root),
               "--memory-max", "6G", "--exec", EXEC])
    assert rc == 0
    unit_path = root / "etc/systemd/system/fedmq-agent.service"
    unit = unit_path.read_text()
    proc = systemd_verify(unit_path)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    for line in (
        "Type=notify", "WatchdogSec=600s", "Restart=on-failure", "DynamicUser=yes", "StateDirectory=fedmq-agent",
        "MemoryMax=6G", "NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
        f"ExecStart={EXEC} agent --config /etc/fedmq/agent.yaml",
        f"LoadCredential=broker-password:{tmp_path / 'agent.password'}",
    ):
        assert line in unit.splitlines(), line
    # The installed config points the service at paths its sandbox allows.
    cfg = yaml.safe_load((root / "etc/fedmq/agent.yaml").read_text())
    assert cfg["state_dir"] == "/var/lib/fedmq-agent"
    assert cfg["broker"]["password_file"] == "/run/credentials/fedmq-agent.service/broker-password"
    assert cfg["device_id"] == "jetson-07" and cfg["method"] == "qlora"
    out = capsys.readouterr().out
    assert "wrote" in out and "credential" in out


def test_install_coordinator_unit_verifies_and_hides_devices(tmp_path):
    cfg = write_yaml(tmp_path / "coordinator.yaml", {"broker": {"url": "mqtts://broker.lan:8883"}, "rounds": 5})
    root = tmp_path / "root"
    assert main(["service", "install", "coordinator", "--config", str(cfg), "--root", str(root), "--exec", EXEC]) == 0
    unit_path = root / "etc/systemd/system/fedmq-coordinator.service"
    proc = systemd_verify(unit_path)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    unit = unit_path.read_text().splitlines()
    assert "PrivateDevices=yes" in unit and "MemoryMax=50%" in unit and "WatchdogSec=120s" in unit
    installed = yaml.safe_load((root / "etc/fedmq/coordinator.yaml").read_text())
    assert installed["state_dir"] == "/var/lib/fedmq-coordinator" and installed["rounds"] == 5


def test_install_refuses_an_invalid_config_and_writes_nothing(tmp_path, capsys):
    bad = write_yaml(tmp_path / "agent.yaml", {"device_id": "d", "model": "m", "trainig": {}})
    root = tmp_path / "root"
    assert main(["service", "install", "agent", "--config", str(bad), "--root", str(root)]) == 2
    assert "unknown key 'trainig'" in capsys.readouterr().err
    assert not root.exists()


def test_installed_agent_config_still_validates_once_credentials_exist(tmp_path, agent_yaml):
    root = tmp_path / "root"
    main(["service", "install", "agent", "--config", str(agent_yaml), "--root", str(root), "--exec", EXEC])
    raw = yaml.safe_load((root / "etc/fedmq/agent.yaml").read_text())
    # what systemd provides at run time: the credential file and the state directory
    raw["broker"]["password_file"] = str(tmp_path / "agent.password")
    cfg = load_config(write_yaml(tmp_path / "check.yaml", raw), AgentConfig)
    assert cfg.broker.username == "jetson-07"


def test_shipped_units_are_the_default_renderings():
    for kind in ("agent", "coordinator", "split-server"):
        assert (REPO / "systemd" / f"fedmq-{kind}.service").read_text() == render_unit(UnitOptions(kind))


@pytest.mark.parametrize("value, expected", [
    ("6G", "6G"), ("6GB", "6G"), ("6GiB", "6G"), ("512m", "512M"), (4096, "4096M"), ("1.5G", "1536M"), ("75%", "75%"),
])
def test_memory_sizes(value, expected):
    assert parse_memory(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1G", 0, "150%", True])
def test_bad_memory_sizes_are_refused(value):
    with pytest.raises(ConfigError):
        parse_memory(value)


def test_memory_cap_follows_the_agent_memory_budget():
    assert memory_budget_from({"memory_budget": "7GB"}) == "7G"
    assert memory_budget_from({"memory_budget": {"ram": "3.5G"}}) == "3584M"
    assert memory_budget_from({"device_id": "x"}) is None
