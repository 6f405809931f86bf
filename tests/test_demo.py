"""The README's main command works: `fedmq demo` end to end (tiny model to stay fast)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.federation import REPO


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
