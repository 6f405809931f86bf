"""The README's main command works: `fedmq demo` end to end (tiny model to stay fast)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.federation import REPO


def warnings_in(stderr: str, workdir: Path) -> list[str]:
    """WARNING lines of the demo's own log (the coordinator runs in it) and of every agent's."""
    lines = [ln for ln in stderr.splitlines() if " WARNING " in ln]
    for log in sorted((workdir / "logs").glob("*.log")):
        lines += [f"{log.name}: {ln}" for ln in log.read_text().splitlines() if "WARNING" in ln or "%|" in ln]
    return lines


@pytest.mark.parametrize("broker", ["embedded", "mosquitto"])
def test_demo_runs_rounds_and_writes_summary(tmp_path, mosquitto, broker):
    summary = tmp_path / "summary.json"
    args = [sys.executable, "-m", "fedmq", "demo", "--model", "tiny-llama", "--method", "lora",
            "--agents", "2", "--rounds", "2", "--local-steps", "4", "--lr", "0.01",
            "--workdir", str(tmp_path / "work"), "--summary", str(summary)]
    if broker == "mosquitto":
        args += ["--broker", mosquitto().url]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fedmq demo: per round" in proc.stderr
    doc = json.loads(summary.read_text())
    rounds = doc["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert len(r["participants"]) == 2
        assert r["uplink_bytes"] > 0 and r["downlink_bytes"] > 0
        assert r["eval_loss"] is not None
    assert rounds[2]["eval_loss"] < rounds[0]["eval_loss"]
    # the demo leaves the YAML a real deployment would use
    assert (tmp_path / "work" / "agent-0.yaml").exists() and (tmp_path / "work" / "coordinator.yaml").exists()
    # every device holds the same eval file: one evaluates, and its time is reported apart from training
    for r in rounds:
        assert r["eval_devices"] == 1
        assert r["eval_s"] > 0 and r["fit_s"] >= 0
        assert abs(r["fit_s"] + r["eval_s"] - r["duration_s"]) < 0.01
    assert rounds[1]["fit_s"] > 0
    # a healthy run logs no warning (and no progress bar into the agents' log files)
    assert warnings_in(proc.stderr, tmp_path / "work") == []


def test_zo_demo_with_codec_and_mqtt_options(tmp_path, mosquitto):
    summary, work = tmp_path / "summary.json", tmp_path / "work"
    args = [sys.executable, "-m", "fedmq", "demo", "--model", "tiny-llama", "--method", "zo",
            "--agents", "2", "--rounds", "1", "--local-steps", "4", "--lr", "1e-3",
            "--broker", mosquitto().url, "--mqtt-version", "3.1.1", "--uplink", "int4", "--downlink", "int8",
            "--workdir", str(work), "--summary", str(summary)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rounds = json.loads(summary.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and len(rounds[1]["participants"]) == 2
    coord = yaml.safe_load((work / "coordinator.yaml").read_text())
    agent = yaml.safe_load((work / "agent-0.yaml").read_text())
    assert coord["zo"]["lr"] == 1e-3 and coord["downlink"]["values"] == "int8"
    assert coord["broker"]["mqtt_version"] == agent["broker"]["mqtt_version"] == "3.1.1"
    assert agent["method"] == "zo" and agent["uplink"]["values"] == "int4"
    assert warnings_in(proc.stderr, work) == []


def test_demo_names_the_device_that_died_and_why(tmp_path):
    # an install without the agent extra: importing peft fails in every agent
    shadow = tmp_path / "no-peft"
    shadow.mkdir()
    (shadow / "peft.py").write_text("raise ModuleNotFoundError(\"No module named 'peft'\", name='peft')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(shadow), os.environ.get("PYTHONPATH")])))
    args = [sys.executable, "-m", "fedmq", "demo", "--model", "tiny-llama", "--method", "lora",
            "--agents", "2", "--rounds", "1", "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("fedmq: error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert re.match(r"fedmq: error: device device-[01] exited \(code 1\): "
                    r"ModuleNotFoundError: No module named 'peft'; see ", errors[0]), errors[0]
    assert "Traceback" not in proc.stderr and "RoundFailed" not in proc.stderr
