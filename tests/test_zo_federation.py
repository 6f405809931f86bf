"""Zeroth-order (FedKSeed) federation on a real Mosquitto: coordinator and agents as processes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import msgpack

from edge_agent.data import synthesize
from fedmq_protocol.modes.zo import ZoLedgerRound
from fedmq_protocol.topics import Topics
from tests.federation import Capture, agent_config, coordinator_config, spawn, stop_all

ZO = {"seed": 7, "num_seeds": 64, "eps": 1e-2, "lr": 1e-3, "direction": "gaussian", "target": "full"}


def _zo_state(tmp: Path, i: int) -> dict | None:
    f = tmp / f"agent-{i}" / "zo-state.json"
    return json.loads(f.read_text()) if f.exists() else None


def _wait(pred, timeout: float, what) -> None:
    """Poll ``pred``; on time-out fail with ``what`` (a string, or a callable read at that moment)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")
        time.sleep(0.2)


def test_agent_joining_at_round_5_replays_the_ledger_and_ends_bitwise_equal_to_the_others(mosquitto, tmp_path):
    broker = mosquitto(message_size_limit=8 * 1024)
    data = tmp_path / "data"
    synthesize(data, num_devices=3, samples_per_device=20, eval_samples=8, seed=3)
    chunked = {"chunk_size": 4096}
    capture = Capture(broker.url, Topics("fedmq", "test"), chunk_size=4096).start()
    zo_cfg = {"broker": chunked, "zo": ZO, "fit": {"local_steps": 20, "lr": 1e-3, "batch_size": 2, "max_seq_len": 48}}

    def agent_cmd(i: int) -> list[str]:
        return ["agent", "--config", str(agent_config(tmp_path, i, broker.url, data, method="zo", broker=chunked))]

    def coordinator_cmd(rounds: int, min_clients: int) -> list[str]:
        return ["coordinator", "--config",
                str(coordinator_config(tmp_path, broker.url, rounds=rounds, min_clients=min_clients, **zo_cfg))]

    agents = [spawn(agent_cmd(i), tmp_path / f"a{i}.log") for i in range(2)]
    procs = list(agents)
    try:
        # rounds 1-4 with two devices
        coord = spawn(coordinator_cmd(rounds=4, min_clients=2), tmp_path / "coord.log")
        procs.append(coord)
        assert coord.wait(timeout=300) == 0, (tmp_path / "coord.log").read_text()[-3000:]
        # a third device joins after round 4; the coordinator, restarted from its persisted state,
        # waits for all three, so the newcomer catches up from the ledger and trains in rounds 5-6
        procs.append(spawn(agent_cmd(2), tmp_path / "a2.log"))
        coord = spawn(coordinator_cmd(rounds=6, min_clients=3), tmp_path / "coord2.log")
        procs.append(coord)
        assert coord.wait(timeout=300) == 0, (tmp_path / "coord2.log").read_text()[-3000:]
        _wait(lambda: all((_zo_state(tmp_path, i) or {}).get("applied_round") == 6 for i in range(3)), 60,
              "every agent at round 6")
    finally:
        stop_all(procs)
        capture.close()

    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    history = {h["round"]: h for h in state["history"]}
    assert sorted(history[4]["participants"]) == ["dev-0", "dev-1"]
    assert all("dev-2" in history[r]["participants"] for r in (5, 6))  # the newcomer trained after catching up
    digests = {i: _zo_state(tmp_path, i)["param_digest"] for i in range(3)}
    assert len(set(digests.values())) == 1, digests

    # the persisted ledger: the mode state file that state.json names
    blob = msgpack.unpackb((tmp_path / "coordinator" / state["mode_state_file"]).read_bytes(), raw=False)
    ledger = [ZoLedgerRound.model_validate(x) for x in blob["ledger"]]
    assert [e.round for e in ledger] == [1, 2, 3, 4, 5, 6]
    # The global is "base + ledger": replaying the coordinator's persisted ledger on a fresh base
    # gives the agents' weights bit for bit.
    from edge_agent.methods.zo import ZoMethod
    from edge_agent.models import resolve_model
    from fedmq_protocol.messages import AdapterSpec

    fresh = ZoMethod(resolve_model("tiny-llama"), AdapterSpec(), device="cpu", target="full")
    assert all(e.spec.base_fingerprint == fresh.fingerprint for e in ledger)
    for e in ledger:
        fresh.apply_round(e)
    assert fresh.param_digest() == digests[0]
    # Updates are seeds and scalars: 20 steps -> at most 20 (index, g) pairs.
    fits = [u for u in capture.updates if u.kind == "fit"]
    assert fits and all(u.payload is not None and u.tensors.empty and len(u.payload.indices) <= 40 for u in fits)
    assert all(len(json.dumps(h)) > 0 and h["uplink_bytes"] < 2 * 2048 for r, h in history.items() if r >= 1 and r <= 4)
