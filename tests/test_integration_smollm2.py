"""SmolLM2-135M-Instruct (a real pretrained LLM) federated with QLoRA on CPU over Mosquitto."""

from __future__ import annotations

import json

import pytest

from edge_agent.data import synthesize
from tests.federation import agent_config, coordinator_config, spawn, stop_all

pytestmark = pytest.mark.integration


def test_smollm2_qlora_two_agents_two_rounds_lowers_heldout_loss(mosquitto, tmp_path):
    broker = mosquitto()
    data = tmp_path / "data"
    synthesize(data, num_devices=2, samples_per_device=60, eval_samples=24, seed=3)
    fit = {"local_steps": 6, "lr": 2e-3, "batch_size": 4, "max_seq_len": 64}
    procs = [
        spawn(["agent", "--config", str(agent_config(tmp_path, i, broker.url, data, model="smollm2-135m",
                                                     method="qlora"))], tmp_path / f"a{i}.log")
        for i in range(2)
    ]
    try:
        cfg = coordinator_config(tmp_path, broker.url, rounds=2, min_clients=2, fit=fit, model="smollm2-135m")
        coord = spawn(["coordinator", "--config", str(cfg)], tmp_path / "coord.log")
        assert coord.wait(timeout=900) == 0, (tmp_path / "coord.log").read_text()[-3000:]
    finally:
        stop_all(procs)
    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    losses = [h["eval_loss"] for h in state["history"]]
    assert len(losses) == 3 and all(loss is not None for loss in losses)
    assert losses[2] < losses[0], losses
    logs = "".join((tmp_path / f"a{i}.log").read_text() for i in range(2))
    assert "qlora" in logs
