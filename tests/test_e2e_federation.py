"""End to end on a real Mosquitto: a coordinator and three agents, each its own process."""

from __future__ import annotations

import json
import time

import numpy as np

from edge_agent.data import synthesize
from fedmq_protocol.topics import Topics
from tests.federation import (
    DENSE_DOWNLINK,
    DENSE_UPLINK,
    Capture,
    agent_config,
    coordinator_config,
    fedavg,
    spawn,
    stop_all,
    wait_for_status,
)

# The broker refuses any MQTT message over 8 KiB; the adapter is larger, so every update and
# global must travel chunked (4 KiB chunks) and be reassembled.
SIZE_LIMIT = 8 * 1024
CHUNKED = {"chunk_size": 4096}


def test_three_agents_three_rounds_global_is_fedavg_of_sent_updates(mosquitto, tmp_path):
    broker = mosquitto(message_size_limit=SIZE_LIMIT)
    data = tmp_path / "data"
    synthesize(data, num_devices=3, samples_per_device=60, eval_samples=40, seed=1)
    capture = Capture(broker.url, Topics("fedmq", "test"), chunk_size=CHUNKED["chunk_size"]).start()
    # dense fp32 both ways: the globals are checked against exact FedAvg of the updates sent
    coord_cfg = coordinator_config(tmp_path, broker.url, rounds=3, min_clients=3, broker=CHUNKED,
                                   downlink=DENSE_DOWNLINK)
    procs = [spawn(["agent", "--config", str(agent_config(tmp_path, i, broker.url, data, broker=CHUNKED,
                                                          uplink=DENSE_UPLINK))],
                   tmp_path / f"a{i}.log")
             for i in range(3)]
    try:
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
        rc = coord.wait(timeout=600)
        assert rc == 0, (tmp_path / "coord.log").read_text()[-3000:]
        time.sleep(0.5)
    finally:
        stop_all(procs)
        capture.close()

    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    assert state["round_completed"] == 3 and state["global_version"] == 3
    history = {h["round"]: h for h in state["history"]}
    assert sorted(history) == [0, 1, 2, 3]

    # The adapter does not fit in one MQTT message under this broker's limit.
    assert len(capture.globals_[0].to_msgpack()) > SIZE_LIMIT
    # Every published global v>=1 equals FedAvg of the updates the devices sent against v-1
    # (v0 is a snapshot, v1..v3 differences that the capture reconstructs like a device).
    assert sorted(capture.globals_) == [0, 1, 2, 3] == sorted(capture.weights)
    assert capture.globals_[0].is_snapshot and all(capture.globals_[v].base_version == v - 1 for v in (1, 2, 3))
    for v in (1, 2, 3):
        sent = {u.device_id: u for u in capture.updates if u.kind == "fit" and u.base_version == v - 1}
        participants = history[v]["participants"]
        assert sorted(sent) == sorted(participants) == ["dev-0", "dev-1", "dev-2"]
        expected = fedavg(capture.weights[v - 1], [sent[d] for d in participants])
        got = capture.weights[v]
        assert set(got) == set(expected)
        for name, arr in expected.items():
            np.testing.assert_allclose(got[name], arr, rtol=0, atol=1e-6, err_msg=name)
        assert history[v]["uplink_bytes"] > 0 and history[v]["downlink_bytes"] > 0

    # Held-out loss of the final global is below the initial global's.
    assert history[3]["eval_loss"] < history[0]["eval_loss"], [history[r]["eval_loss"] for r in range(4)]
    # Round metrics were also published on the broker for observers.
    assert [r.round for r in capture.rounds][-1] == 3


def test_coordinator_restarted_continues_from_last_completed_round(mosquitto, tmp_path):
    broker = mosquitto()
    data = tmp_path / "data"
    synthesize(data, num_devices=2, samples_per_device=40, eval_samples=20, seed=2)
    fit = {"local_steps": 3, "lr": 3e-3, "batch_size": 4, "max_seq_len": 48}
    procs = [spawn(["agent", "--config", str(agent_config(tmp_path, i, broker.url, data))], tmp_path / f"a{i}.log")
             for i in range(2)]
    try:
        cfg = coordinator_config(tmp_path, broker.url, rounds=2, min_clients=2, fit=fit)
        assert spawn(["coordinator", "--config", str(cfg)], tmp_path / "c1.log").wait(timeout=300) == 0
        first = json.loads((tmp_path / "coordinator" / "state.json").read_text())
        assert first["round_completed"] == 2
        cfg = coordinator_config(tmp_path, broker.url, rounds=3, min_clients=2, fit=fit)
        assert spawn(["coordinator", "--config", str(cfg)], tmp_path / "c2.log").wait(timeout=300) == 0

        # A device that joins after the last round picks up the retained global (version 3).
        late = agent_config(tmp_path, 2, broker.url, data, data_file="device_0.jsonl")
        procs.append(spawn(["agent", "--config", str(late)], tmp_path / "a2.log"))
        status = wait_for_status(broker.url, "dev-2", lambda s: s.applied_version == 3, timeout=60)
        assert status.online and status.applied_version == 3
    finally:
        stop_all(procs)
    second = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    assert second["round_completed"] == 3 and second["global_version"] == 3
    assert [h["round"] for h in second["history"]] == [0, 1, 2, 3]  # no round repeated
    assert "initialising" not in (tmp_path / "c2.log").read_text()


def test_compressed_federation_sparse_updates_budget_and_lossy_downlink_agree_bitwise(mosquitto, tmp_path):
    """Agents send top-k int8 updates (one under a byte budget), the coordinator publishes int8
    differences with a snapshot every 2 versions and uses FedAvgM: every device ends on exactly the
    coordinator's weights and every update fits its budget."""
    from fedmq_protocol import messages as m

    broker = mosquitto(message_size_limit=SIZE_LIMIT)
    data = tmp_path / "data"
    synthesize(data, num_devices=3, samples_per_device=40, eval_samples=20, seed=4)
    capture = Capture(broker.url, Topics("fedmq", "test"), chunk_size=CHUNKED["chunk_size"]).start()
    budget = 3000
    uplinks = [{"uplink": {"values": "int8", "density": 0.1, "zstd": True}},
               {"uplink": {"values": "float16", "density": 0.2}},
               {"uplink": {"zstd": True}, "uplink_budget_bytes": budget}]
    procs = [spawn(["agent", "--config",
                    str(agent_config(tmp_path, i, broker.url, data, broker=CHUNKED, **uplinks[i]))],
                   tmp_path / f"a{i}.log") for i in range(3)]
    try:
        cfg = coordinator_config(
            tmp_path, broker.url, rounds=3, min_clients=3, broker=CHUNKED,
            fit={"local_steps": 4, "lr": 3e-3, "batch_size": 4, "max_seq_len": 48},
            downlink={"snapshot_every": 2, "values": "int8", "density": 0.5, "zstd": True},
            server_optimizer={"name": "fedavgm", "lr": 1.0, "momentum": 0.5})
        coord = spawn(["coordinator", "--config", str(cfg)], tmp_path / "coord.log")
        assert coord.wait(timeout=600) == 0, (tmp_path / "coord.log").read_text()[-3000:]
        statuses = [wait_for_status(broker.url, f"dev-{i}", lambda s: s.applied_version == 3, timeout=60)
                    for i in range(3)]
    finally:
        stop_all(procs)
        capture.close()
    assert all(s.applied_version == 3 for s in statuses)
    # v0 and v2 snapshots, v1 and v3 differences from their predecessor
    assert [capture.globals_[v].base_version for v in range(4)] == [None, 0, None, 2]
    # the persisted global (what the coordinator checks updates against) equals the devices' reconstruction
    saved = m.GlobalModel.from_msgpack((tmp_path / "coordinator" / "global-v3.msgpack").read_bytes())
    for name, arr in saved.tensors.decode_dense(max_elements=1 << 24).items():
        np.testing.assert_array_equal(capture.weights[3][name], arr, err_msg=name)
    fits = [u for u in capture.updates if u.kind == "fit"]
    assert len(fits) == 9
    for u in fits:
        if u.device_id == "dev-2":
            assert len(u.to_msgpack()) <= budget and u.metrics["uplink_budget_bytes"] == budget
        assert u.metrics["uplink_bytes"] == len(u.to_msgpack())
    dense_fp32_bytes = 4 * sum(a.size for a in capture.weights[0].values())
    assert max(len(u.to_msgpack()) for u in fits) < dense_fp32_bytes / 3
