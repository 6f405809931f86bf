"""Devices with different memory plans train one adapter together; a device whose budget holds
no plan refuses, says why, and is not selected (real Mosquitto, agents and coordinator as processes)."""

from __future__ import annotations

import json

from edge_agent.data import synthesize
from tests.federation import agent_config, coordinator_config, spawn, stop_all, wait_for_status


def test_mixed_plans_share_one_adapter_and_a_refusing_device_is_skipped(mosquitto, tmp_path):
    broker = mosquitto()
    data = tmp_path / "data"
    synthesize(data, num_devices=3, samples_per_device=24, eval_samples=8, seed=5)
    agents = [
        agent_config(tmp_path, 0, broker.url, data, method="lora", memory_budget={"host_mb": 8192}),
        agent_config(tmp_path, 1, broker.url, data, method="qlora", memory_budget="8G"),
        agent_config(tmp_path, 2, broker.url, data, method="lora", memory_budget={"host_mb": 64}),
    ]
    procs = [spawn(["agent", "--config", str(cfg)], tmp_path / f"a{i}.log") for i, cfg in enumerate(agents)]
    try:
        refused = wait_for_status(broker.url, "dev-2", lambda s: s.state == "refused", timeout=300)
        assert refused.memory.plan is None and refused.memory.min_host_mb > 64
        assert "memory_budget" in refused.memory.refused and "too small" in refused.memory.refused
        cfg = coordinator_config(tmp_path, broker.url, rounds=1, min_clients=2,
                                 fit={"local_steps": 3, "lr": 3e-3, "batch_size": 4, "max_seq_len": 48})
        coord = spawn(["coordinator", "--config", str(cfg)], tmp_path / "coord.log")
        procs.append(coord)
        assert coord.wait(timeout=480) == 0, (tmp_path / "coord.log").read_text()[-3000:]
    finally:
        stop_all(procs)
    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    rnd = next(h for h in state["history"] if h["round"] == 1)
    assert rnd["participants"] == ["dev-0", "dev-1"] and "dev-2" not in rnd["selected"]
    assert rnd["eval_loss"] is not None
    devs = state["devices"]
    assert devs["dev-0"]["memory"]["plan"]["method"] == "lora"
    assert devs["dev-1"]["memory"]["plan"]["method"] == "qlora"
    assert devs["dev-0"]["memory"]["plan"]["estimate_host_mb"] > 0
    assert devs["dev-2"]["state"] in ("refused", "offline")
