"""A fleet behind the broker deployment of configs/mosquitto/: TLS with generated certificates,
passwords and the shipped ACL. One federation run (tiny model, real processes) backs all tests here:
the ACL stops a device from writing another device's topics, `fedmq watch` shows the run, and
`fedmq report` turns its recorded topics or the coordinator's state into plots and a summary."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from edge_agent.data import synthesize
from fedmq_protocol import messages as m
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport, TransportError
from fedmq_protocol.transport.config import BrokerConfig
from tests.federation import REPO, agent_config, coordinator_config, spawn, stop_all
from tests.mosquitto import MosquittoBroker, find_mosquitto

USERS = {"dev-0": "pw-dev-0", "dev-1": "pw-dev-1", "coordinator": "pw-coord", "watcher": "pw-watch"}
TOPICS = Topics("fedmq", "test")


def creds(tmp: Path, broker: MosquittoBroker, user: str) -> dict:
    pw = tmp / f"{user}.password"
    pw.write_text(USERS[user] + "\n")
    pw.chmod(0o600)
    return {"username": user, "password_file": str(pw), "ca_file": str(broker.tls_files.ca_file)}


def forged_update(task_id: str, device_id: str) -> bytes:
    return m.Update(kind="evaluate", task_id=task_id, round=1, device_id=device_id, base_version=0,
                    num_samples=1, metrics={"eval_loss": 0.01}).to_msgpack()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    pytest.importorskip("cryptography")
    tmp = tmp_path_factory.mktemp("secure-fleet")
    acl = (REPO / "configs/mosquitto/acl").read_text()
    broker = MosquittoBroker(tmp / "broker", users=USERS, acl=acl, tls=True).start()
    data = tmp / "data"
    synthesize(data, num_devices=2, samples_per_device=40, eval_samples=20, seed=4)
    procs: list[subprocess.Popen] = []
    watcher_cfg = creds(tmp, broker, "watcher")
    coord_status: list[m.CoordinatorStatus] = []
    training = threading.Event()

    def on_status(topic: str, payload: bytes) -> None:
        if payload:
            st = m.CoordinatorStatus.from_json(payload)
            coord_status.append(st)
            if st.state == "training":
                training.set()

    observer = MqttTransport(BrokerConfig(url=broker.url, **watcher_cfg), "observer", clean_start=True)
    observer.subscribe(TOPICS.coordinator_status, on_status, qos=1)
    observer.connect(10)
    try:
        record = tmp / "topics.jsonl"
        procs.append(spawn(["watch", "--broker", broker.url, "--federation", "test", "--record", str(record),
                            "--no-ui", "--until-finished", "--duration", "300",
                            *(arg for k, v in watcher_cfg.items() for arg in (f"--{k.replace('_', '-')}", v))],
                           tmp / "watch.log"))
        for i in range(2):
            cfg = agent_config(tmp, i, broker.url, data, broker=creds(tmp, broker, f"dev-{i}"))
            procs.append(spawn(["agent", "--config", str(cfg)], tmp / f"a{i}.log"))
        time.sleep(1.0)  # the recorder subscribes before the run starts
        coord_cfg = coordinator_config(tmp, broker.url, rounds=2, min_clients=2,
                                       broker=creds(tmp, broker, "coordinator"),
                                       fit={"local_steps": 3, "lr": 3e-3, "batch_size": 4, "max_seq_len": 48})
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp / "coord.log")
        procs.append(coord)
        assert training.wait(180), (tmp / "coord.log").read_text()[-3000:]

        # dev-0 tries to pass an update off as dev-1's; dev-1 sends a (bogus) one on its own topic
        outcome = {}
        for user, task_id in (("dev-0", "forged-by-dev-0"), ("dev-1", "control-by-dev-1")):
            t = MqttTransport(BrokerConfig(url=broker.url, **creds(tmp, broker, user)), f"{user}-x", clean_start=True)
            t.connect(10)
            try:
                t.publish(TOPICS.device_update("dev-1"), forged_update(task_id, "dev-1"), qos=1, framed=True)
                outcome[user] = "accepted"
            except TransportError as exc:
                outcome[user] = f"refused: {exc}"
            finally:
                t.close()
        assert coord.wait(timeout=300) == 0, (tmp / "coord.log").read_text()[-3000:]
        procs[0].wait(timeout=30)  # the recorder stops once the coordinator reports finished
        yield {"tmp": tmp, "broker": broker, "outcome": outcome, "record": record, "watcher": watcher_cfg,
               "coord_log": (tmp / "coord.log").read_text()}
    finally:
        observer.close()
        stop_all(procs)
        broker.stop()


def test_secured_federation_completes_over_tls_with_passwords_and_acl(fleet):
    state = json.loads((fleet["tmp"] / "coordinator" / "state.json").read_text())
    assert state["round_completed"] == 2
    assert all(sorted(h["participants"]) == ["dev-0", "dev-1"] for h in state["history"][1:])
    log = fleet["broker"].log_text()
    assert "dev-0" in log and "coordinator" in log  # authenticated clients, by username


def test_acl_denies_device_a_publishing_on_device_b_topic_and_the_coordinator_never_sees_it(fleet):
    assert fleet["outcome"]["dev-0"].startswith("refused") and "authori" in fleet["outcome"]["dev-0"].lower()
    assert fleet["outcome"]["dev-1"] == "accepted"
    # the coordinator saw (and refused, as its task is not open) only the update dev-1 really sent
    assert "control-by-dev-1" in fleet["coord_log"]
    assert "forged-by-dev-0" not in fleet["coord_log"]


def test_acl_lets_a_device_read_only_its_own_task(fleet):
    broker, tmp = fleet["broker"], fleet["tmp"]
    got: list[str] = []
    t = MqttTransport(BrokerConfig(url=broker.url, **creds(tmp, broker, "dev-0")), "dev-0-snoop", clean_start=True)
    t.subscribe(TOPICS.device_task("dev-1"), lambda topic, payload: got.append(topic), qos=1)
    t.subscribe(TOPICS.device_task("dev-0"), lambda topic, payload: got.append(topic), qos=1)
    t.connect(10)
    try:
        c = MqttTransport(BrokerConfig(url=broker.url, **creds(tmp, broker, "coordinator")), "coord-x",
                          clean_start=True)
        c.connect(10)
        c.publish(TOPICS.device_task("dev-1"), b"x" * 10, qos=1)
        c.publish(TOPICS.device_task("dev-0"), b"y" * 10, qos=1)
        c.close()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        t.close()
    assert got == [TOPICS.device_task("dev-0")]


def test_watch_once_shows_the_devices_of_the_run(fleet):
    w = fleet["watcher"]
    args = [sys.executable, "-m", "fedmq", "watch", "--once", "--broker", fleet["broker"].url,
            "--federation", "test", "--username", "watcher", "--password-file", w["password_file"],
            "--ca-file", w["ca_file"]]
    table = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=60,
                           env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
    assert table.returncode == 0, table.stderr
    for needle in ("dev-0", "dev-1", "lora", "2/2 devices online", "round 2/2", "global v2"):
        assert needle in table.stdout, (needle, table.stdout)
    snap = subprocess.run([*args, "--json"], cwd=REPO, capture_output=True, text=True, timeout=60)
    doc = json.loads(snap.stdout)
    assert sorted(doc["devices"]) == ["dev-0", "dev-1"]
    assert all(d["status"]["online"] and d["status"]["applied_version"] == 2 for d in doc["devices"].values())
    assert doc["coordinator"]["round"] == 2 and doc["rounds"][-1]["round"] == 2


def test_recorded_topics_hold_every_round_with_per_device_bytes(fleet):
    lines = [json.loads(x) for x in fleet["record"].read_text().splitlines()]
    rounds = [x["payload"] for x in lines if x["topic"] == TOPICS.rounds]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert sorted(r["uplink_bytes_by_device"]) == ["dev-0", "dev-1"]
        assert sum(r["uplink_bytes_by_device"].values()) == r["uplink_bytes"]
        assert sum(r["downlink_bytes_by_device"].values()) == r["downlink_bytes"]
    assert any(x["topic"].endswith("/telemetry") for x in lines)


@pytest.mark.parametrize("source", ["log", "state"])
def test_report_writes_plots_and_summary(fleet, source, tmp_path):
    src = ["--log", str(fleet["record"])] if source == "log" else ["--state", str(fleet["tmp"] / "coordinator")]
    proc = subprocess.run([sys.executable, "-m", "fedmq", "report", *src, "--out", str(tmp_path)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for png in ("eval_loss.png", "bytes.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    md = (tmp_path / "report.md").read_text()
    state = json.loads((fleet["tmp"] / "coordinator" / "state.json").read_text())
    for h in state["history"]:
        assert f"{h['eval_loss']:.4f}" in md
    assert "| dev-0 | lora | 2 |" in md and "| dev-1 | " in md
    assert "![eval_loss](eval_loss.png)" in md


def test_shipped_acl_carries_the_modes_retained_messages_and_each_devices_split_topics(tmp_path):
    """The zo and krso ledgers (written by the coordinator) reach devices; a device's split
    activations reach the split server, which answers that device only; nobody else's split topic
    is open to a device."""
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    users = {"dev-0": "pw-0", "dev-1": "pw-1", "coordinator": "pw-c", "split-server": "pw-s"}
    broker = MosquittoBroker(tmp_path / "broker", users=users,
                             acl=(REPO / "configs/mosquitto/acl").read_text()).start()
    base = TOPICS.base
    got: dict[str, list[str]] = {u: [] for u in users}

    def client(user: str, *filters: str) -> MqttTransport:
        pw = tmp_path / f"{user}.pw"
        pw.write_text(users[user] + "\n")
        t = MqttTransport(BrokerConfig(url=broker.url, username=user, password_file=str(pw)), f"{user}-acl",
                          clean_start=True)
        for f in filters:
            t.subscribe(f, lambda topic, payload, user=user: got[user].append(topic), qos=1)
        t.connect(10)
        return t

    clients = []
    try:
        coord = client("coordinator")
        clients.append(coord)
        for topic in (f"{base}/zo/ledger/1", f"{base}/krso/ledger/1", f"{base}/krso/checkpoint"):
            coord.publish(topic, b"ledger", qos=1, retain=True)
        clients += [client("dev-0", f"{base}/zo/ledger/+", f"{base}/krso/#", f"{base}/split/dev-0/response"),
                    client("dev-1", f"{base}/split/dev-0/response", f"{base}/split/+/request"),
                    client("split-server", f"{base}/split/+/request")]
        dev0, server = clients[1], clients[3]
        dev0.publish(f"{base}/split/dev-0/request", b"a", qos=1)
        with pytest.raises(TransportError, match="Not authorized"):
            dev0.publish(f"{base}/split/dev-1/request", b"forged", qos=1)
        server.publish(f"{base}/split/dev-0/response", b"g", qos=1)
        deadline = time.monotonic() + 5
        while (len(got["dev-0"]) < 4 or not got["split-server"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
    finally:
        for c in clients:
            c.close()
        broker.stop()
    assert sorted(got["dev-0"]) == sorted([f"{base}/krso/checkpoint", f"{base}/krso/ledger/1",
                                           f"{base}/split/dev-0/response", f"{base}/zo/ledger/1"])
    assert got["split-server"] == [f"{base}/split/dev-0/request"]  # not the request forged for dev-1
    assert got["dev-1"] == []  # another device's gradients and requests stay closed to it
