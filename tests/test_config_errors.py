"""Bad configuration gives one clear line naming the key or the problem."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.federation import REPO


def run_fedmq(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmq", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fedmq: error:")]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


@pytest.fixture
def train_file(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text('{"prompt": "2+2", "response": "4"}\n')
    return p


def write(tmp_path, obj) -> str:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(obj))
    return str(p)


def test_unknown_key_is_named(tmp_path, train_file):
    cfg = write(tmp_path, {"device_id": "a", "model": "tiny-llama", "data": {"train": str(train_file)},
                           "trainig": {"max_batch_size": 2}})
    line = error_line(run_fedmq("agent", "--config", cfg))
    assert "unknown key 'trainig'" in line and cfg in line


def test_wrong_type_names_the_nested_key(tmp_path):
    cfg = write(tmp_path, {"rounds": "ten", "broker": {"url": "mqtt://127.0.0.1:1"}})
    line = error_line(run_fedmq("coordinator", "--config", cfg))
    assert "'rounds'" in line and "ten" in line


def test_bad_broker_url_names_broker_url(tmp_path):
    cfg = write(tmp_path, {"broker": {"url": "http://example:80"}})
    line = error_line(run_fedmq("coordinator", "--config", cfg))
    assert "broker.url" in line


def test_missing_config_file(tmp_path):
    line = error_line(run_fedmq("coordinator", "--config", str(tmp_path / "nope.yaml")))
    assert "config file not found" in line and "nope.yaml" in line


def test_missing_data_file_names_data_train(tmp_path):
    cfg = write(tmp_path, {"device_id": "a", "model": "tiny-llama", "data": {"train": str(tmp_path / "x.jsonl")}})
    line = error_line(run_fedmq("agent", "--config", cfg))
    assert "data.train" in line and "x.jsonl" in line


def test_unreachable_broker_names_the_url(tmp_path):
    from fedmq.embedded_broker import free_port

    port = free_port()
    cfg = write(tmp_path, {"broker": {"url": f"mqtt://127.0.0.1:{port}", "connect_timeout_s": 3},
                           "state_dir": str(tmp_path / "s")})
    line = error_line(run_fedmq("coordinator", "--config", cfg))
    assert f"127.0.0.1:{port}" in line


def test_invalid_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("rounds: 3\nbroker: [unclosed\n")
    line = error_line(run_fedmq("coordinator", "--config", str(p)))
    assert "invalid YAML" in line and "line" in line


def test_coordinator_imports_neither_torch_nor_transformers():
    code = (
        "import sys, fedmq.cli, broker_coordinator.coordinator, broker_coordinator.config;"
        "from broker_coordinator.coordinator import Coordinator;"
        "from broker_coordinator.config import CoordinatorConfig;"
        "Coordinator(CoordinatorConfig(state_dir='/tmp/fedmq-notorch'));"
        "bad=[m for m in ('torch','transformers','peft','bitsandbytes') if m in sys.modules];"
        "assert not bad, bad; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
