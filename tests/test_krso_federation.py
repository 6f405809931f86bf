"""FedKRSO federation on a real Mosquitto: coordinator and three agents as processes."""

from __future__ import annotations

import json
import time
from pathlib import Path

from edge_agent.data import synthesize
from tests.federation import agent_config, coordinator_config, spawn, stop_all

KRSO = {"seed": 11, "num_seeds": 4, "rank": 4, "interval": 4, "checkpoint_every": 2}


def _state(tmp: Path, i: int) -> dict | None:
    f = tmp / f"agent-{i}" / "krso-state.json"
    return json.loads(f.read_text()) if f.exists() else None


def test_three_agents_train_three_rounds_and_the_held_out_loss_falls(mosquitto, tmp_path):
    broker = mosquitto(message_size_limit=64 * 1024)
    data = tmp_path / "data"
    synthesize(data, num_devices=3, samples_per_device=24, eval_samples=12, seed=4)
    chunked = {"chunk_size": 16 * 1024}
    fit = {"local_steps": 12, "lr": 1e-2, "batch_size": 4, "max_seq_len": 64}
    coord_cfg = coordinator_config(tmp_path, broker.url, rounds=3, min_clients=3, fit=fit, broker=chunked, krso=KRSO)
    procs = [spawn(["agent", "--config", str(agent_config(tmp_path, i, broker.url, data, method="krso",
                                                          broker=chunked))], tmp_path / f"a{i}.log")
             for i in range(3)]
    try:
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
        procs.append(coord)
        assert coord.wait(timeout=240) == 0, (tmp_path / "coord.log").read_text()[-3000:]
        deadline = time.monotonic() + 60
        while not all((_state(tmp_path, i) or {}).get("applied_round") == 3 for i in range(3)):
            assert time.monotonic() < deadline, [_state(tmp_path, i) for i in range(3)]
            time.sleep(0.3)
    finally:
        stop_all(procs)

    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    history = {h["round"]: h for h in state["history"]}
    assert sorted(history) == [0, 1, 2, 3]  # round 0: the base, evaluated before training
    assert all(sorted(history[r]["participants"]) == ["dev-0", "dev-1", "dev-2"] for r in (1, 2, 3))
    losses = [history[r]["eval_loss"] for r in (0, 1, 2, 3)]
    assert losses[3] < losses[2] < losses[1] < losses[0], losses
    # every device holds the same bits after the last round
    digests = {i: _state(tmp_path, i)["weights_digest"] for i in range(3)}
    assert len(set(digests.values())) == 1, digests
