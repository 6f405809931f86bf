"""Split learning end to end on a real Mosquitto: a coordinator, a split server and three agents,
each its own process, on a tiny Llama cut in three (device: blocks 0 and 3, server: 1 and 2)."""

from __future__ import annotations

import json
import time

import msgpack
import numpy as np

from edge_agent.data import synthesize
from fedmq_protocol.modes.split import server_status_topic
from fedmq_protocol.topics import Topics
from tests.federation import Capture, agent_config, coordinator_config, spawn, stop_all, write_yaml
from tests.split_support import build_deep_tiny_llama

CUT = {"l_head": 1, "l_tail": 1, "activations": "int8", "gradients": "bfloat16", "zstd": True}
ADAPTER = {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj",
                                                    "gate_proj", "up_proj", "down_proj"]}


def test_coordinator_split_server_and_three_agents_three_rounds_held_out_loss_falls(mosquitto, tmp_path):
    broker = mosquitto(message_size_limit=64 * 1024)  # activations and adapters travel chunked
    chunked = {"chunk_size": 16 * 1024}
    model = build_deep_tiny_llama(tmp_path / "model", layers=4)
    data = tmp_path / "data"
    synthesize(data, num_devices=3, samples_per_device=30, eval_samples=24, seed=2)
    topics = Topics("fedmq", "test")
    capture = Capture(broker.url, topics, chunk_size=chunked["chunk_size"]).start()
    server_cfg = write_yaml(tmp_path / "split-server.yaml", {
        "federation": "test", "broker": {"url": broker.url, **chunked}, "model": model, "adapter": ADAPTER,
        "split": CUT, "state_dir": str(tmp_path / "split-server"), "torch_threads": 1, "status_interval_s": 1})
    coord_cfg = coordinator_config(tmp_path, broker.url, rounds=3, min_clients=3, broker=chunked, adapter=ADAPTER,
                                   split=CUT, fit={"local_steps": 6, "lr": 5e-3, "batch_size": 4, "max_seq_len": 64})
    procs = [spawn(["split-server", "--config", str(server_cfg)], tmp_path / "server.log")]
    procs += [spawn(["agent", "--config", str(agent_config(tmp_path, i, broker.url, data, model=model,
                                                           method="split", broker=chunked))], tmp_path / f"a{i}.log")
              for i in range(3)]
    statuses: list[dict] = []
    capture.transport.subscribe(server_status_topic(topics.base),
                                lambda t, p: statuses.append(json.loads(p)) if p else None, qos=1)
    try:
        deadline = time.monotonic() + 120  # the split server is up (it reads the round's tasks) before tasks go out
        while not any(st.get("online") for st in statuses):
            assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "server.log").read_text()
            time.sleep(0.2)
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
        rc = coord.wait(timeout=600)
        assert rc == 0, (tmp_path / "coord.log").read_text()[-3000:] + (tmp_path / "server.log").read_text()[-3000:]
        time.sleep(1.5)  # one more status of the split server
    finally:
        stop_all(procs)
        capture.close()

    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    assert state["round_completed"] == 3
    history = {h["round"]: h for h in state["history"]}
    losses = [history[r]["eval_loss"] for r in range(4)]
    # evaluation runs through the split path too; the held-out loss falls round over round overall
    assert losses[3] < losses[0], losses
    fits = [u for u in capture.updates if u.kind == "fit"]
    assert sorted({u.device_id for u in fits}) == ["dev-0", "dev-1", "dev-2"] and len(fits) == 9
    for u in fits:
        assert u.metrics["steps"] == 6 and u.metrics["split_bytes_up"] > 0 and u.metrics["split_bytes_down"] > 0
        assert u.metrics["split_requests"] >= 12  # two exchanges per step
        # the update is the device's part only: blocks 0 and 3 (the server's 1 and 2 never leave it)
        blocks = {n.split(".layers.")[1].split(".")[0] for n in u.tensors.decode(max_elements=1 << 22)}
        assert blocks == {"0", "3"}
    # the split server applied every device step once, and persisted its adapter (blocks 1 and 2)
    last = statuses[-1]
    assert last["applied"] == 3 * 3 * 6 and last["server_step"] == 54, last
    blob = msgpack.unpackb((tmp_path / "split-server" / "split-server.msgpack").read_bytes(), raw=False)
    assert blob["server_step"] == 54
    assert {n.split(".layers.")[1].split(".")[0] for n in blob["adapter"]} == {"1", "2"}
    b = next(v for n, v in blob["adapter"].items() if ".lora_B." in n)
    assert np.abs(np.frombuffer(b[1], dtype=np.float32)).max() > 0  # trained (lora_B starts at zero)
