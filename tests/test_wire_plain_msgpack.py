"""Every payload a real federation puts on the broker decodes with stock msgpack (or json).

A raw subscriber to ``fedmq/#`` (no fedmq framing code, as ``mosquitto_sub`` would) records a
two-round federation through a Mosquitto whose 8 KiB message limit forces chunking; every payload
must be one ``msgpack.unpackb`` object (JSON topics: ``json.loads``), and the chunked messages
reassembled by hand from those objects (join the chunks' data, check the manifest's digests)
must be the messages the fedmq decoders accept.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict

import msgpack

from edge_agent.data import synthesize
from fedmq_protocol import messages as m
from fedmq_protocol.transport import MqttClient
from fedmq_protocol.transport.config import BrokerConfig
from tests.federation import agent_config, coordinator_config, spawn, stop_all

CHUNKED = {"chunk_size": 4096}
JSON_SUFFIXES = ("/status", "/telemetry", "/rounds")


def test_recorded_federation_traffic_is_plain_msgpack_and_json(mosquitto, tmp_path):
    broker = mosquitto(message_size_limit=8 * 1024)
    data = tmp_path / "data"
    synthesize(data, num_devices=2, samples_per_device=30, eval_samples=20, seed=2)
    recorded: list[tuple[str, bytes]] = []
    lock = threading.Lock()

    def record(topic: str, payload: bytes) -> None:
        with lock:
            recorded.append((topic, bytes(payload)))

    raw = MqttClient(BrokerConfig(url=broker.url), f"raw-{time.time_ns()}", clean_start=True)
    raw.subscribe("fedmq/#", ("fedmq/#",), record, qos=1)
    raw.connect(10)
    procs = [spawn(["agent", "--config", str(agent_config(tmp_path, i, broker.url, data, broker=CHUNKED))],
                   tmp_path / f"a{i}.log") for i in range(2)]
    try:
        cfg = coordinator_config(tmp_path, broker.url, rounds=2, min_clients=2, broker=CHUNKED,
                                 fit={"local_steps": 2, "lr": 3e-3, "batch_size": 4, "max_seq_len": 32})
        coord = spawn(["coordinator", "--config", str(cfg)], tmp_path / "coord.log")
        assert coord.wait(timeout=600) == 0, (tmp_path / "coord.log").read_text()[-3000:]
        time.sleep(0.5)
    finally:
        stop_all(procs)
        raw.close()

    chunks: dict[tuple[str, bytes], dict[int, bytes]] = defaultdict(dict)
    manifests: list[tuple[str, dict]] = []
    messages: list[tuple[str, bytes]] = []
    for topic, payload in recorded:
        if not payload:
            continue  # a retained clear
        if topic.endswith(JSON_SUFFIXES):
            assert isinstance(json.loads(payload), dict), topic
            continue
        obj = msgpack.unpackb(payload, raw=False)  # stock msgpack, nothing stripped
        assert isinstance(obj, dict), topic
        head, _, index = topic.rpartition("/c/")
        if index.isdigit():
            assert list(obj) == ["fedmq_chunk", "transfer", "data"] and obj["fedmq_chunk"] == int(index)
            chunks[(head, obj["transfer"])][obj["fedmq_chunk"]] = obj["data"]
        elif "fedmq_manifest" in obj:
            assert next(iter(obj)) == "fedmq_manifest" and obj["fedmq_manifest"] == 1
            manifests.append((topic, obj))
        else:
            assert next(iter(obj)) in ("schema", "fedmq_sealed"), topic  # a message, or one sealed
            messages.append((topic, payload))
    for topic, man in manifests:  # reassembled by hand, checked by the manifest's digests
        got = chunks[(topic, man["transfer"])]
        assert sorted(got) == list(range(man["chunks"]))
        assert [hashlib.sha256(got[i]).digest() for i in range(man["chunks"])] == man["chunk_sha256"]
        payload = b"".join(got[i] for i in range(man["chunks"]))
        assert len(payload) == man["size"] and hashlib.sha256(payload).digest() == man["sha256"]
        messages.append((topic, payload))

    decoded: dict[str, list] = defaultdict(list)
    for topic, payload in messages:
        obj = msgpack.unpackb(payload, raw=False)
        if "fedmq_sealed" in obj:  # coordinator messages: the message itself is the seal's body
            assert obj["topic"] == topic and len(obj["check"]) == 32
            payload = obj["body"]
        kind = topic.rsplit("/", 1)[-1] if "/global/diff/" not in topic else "diff"
        decoder = {"task": m.Task, "update": m.Update, "global": m.GlobalModel, "diff": m.GlobalModel}[kind]
        decoded[kind].append(decoder.from_msgpack(payload))
    assert manifests, "the 8 KiB broker limit should have forced chunked messages"
    assert {t.rsplit("/", 1)[-1] for t, _ in manifests} & {"global", "update"}
    assert any(len(p) <= CHUNKED["chunk_size"] for _, p in messages)  # and some went whole
    assert {g.version for g in decoded["global"] + decoded["diff"]} == {0, 1, 2}
    assert {u.kind for u in decoded["update"]} >= {"fit", "evaluate"}
    assert {t.kind for t in decoded["task"]} >= {"fit", "evaluate"}
