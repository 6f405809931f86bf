"""End-to-end update signatures (Ed25519): signing, canonical bytes, keys CLI, config, and a live
coordinator refusing an update that a device with valid broker credentials publishes under
another device's id, unsigned updates, and replays."""

from __future__ import annotations

import base64
import time

import msgpack
import numpy as np
import pytest

from broker_coordinator.config import CoordinatorConfig
from edge_agent.config import AgentConfig
from fedmq.cli import main as cli_main
from fedmq.configfile import ConfigError, validate_config
from fedmq_protocol import messages as m
from fedmq_protocol.codec import encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.signing import Signer, Verifier, generate_keypair, load_public_key, new_nonce
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import Published
from tests.fake_device import FakeDevice, read_retained_json, tiny_adapter, update_obj
from tests.federation import Capture, coordinator_config, spawn, stop_all


def _signer(tmp_path, name: str) -> tuple[Signer, str]:
    pem, pub = generate_keypair()
    path = tmp_path / f"{name}.key"
    path.write_bytes(pem)
    return Signer.from_file(path), pub


def _task(kind: str = "fit", round_no: int = 3, version: int = 2) -> m.Task:
    return m.Task(kind=kind, task_id=f"r{round_no}-{kind}-v{version}-a0", round=round_no, device_id="dev-0",
                  global_version=version, deadline_s=60, adapter=m.AdapterSpec(), nonce=new_nonce())


def _roundtrip(obj: dict) -> dict:
    """What the coordinator verifies: the payload decoded and schema-normalised."""
    return m.Update.from_msgpack(msgpack.packb(obj, use_bin_type=True)).to_obj()


def test_signature_verifies_after_the_wire_and_covers_every_field(tmp_path):
    s0, pub0 = _signer(tmp_path, "dev-0")
    s1, pub1 = _signer(tmp_path, "dev-1")
    v = Verifier({"dev-0": load_public_key(pub0), "dev-1": load_public_key(pub1)}, "test")
    task = _task()
    delta = {k: np.full_like(a, 0.5) for k, a in tiny_adapter().items()}
    obj = update_obj(task, "dev-0", delta, federation="test", signer=s0)
    v.verify(_roundtrip(obj), task.nonce)
    # key order on the wire does not matter (canonical body: sorted keys)
    shuffled = dict(reversed(list(obj.items())))
    v.verify(_roundtrip(shuffled), task.nonce)

    def refused(o: dict, nonce: bytes | None = task.nonce, verifier: Verifier = v) -> str:
        with pytest.raises(ProtocolError) as ei:
            verifier.verify(_roundtrip(o), nonce)
        return str(ei.value)

    assert "another task's nonce" in refused(obj, new_nonce())  # replay into another fan-out
    for field, value in [("round", 4), ("base_version", 1), ("task_id", "r3-fit-v2-a1"), ("num_samples", 11),
                         ("metrics", {"train_loss": 0.5}), ("tensors", encode({k: a * 2 for k, a in delta.items()}))]:
        forged = dict(obj, **{field: value})
        if field == "tensors":
            forged["tensors"] = value.to_wire()
        assert "does not verify" in refused(forged), field
    # another device's key, no signature, no key at all, another federation
    assert "does not verify" in refused(update_obj(task, "dev-0", delta, federation="test", signer=s1))
    assert "not signed" in refused(update_obj(task, "dev-0", delta, federation="test"))
    assert "no public key" in refused(update_obj(task, "dev-9", delta, federation="test", signer=s0))
    assert "does not verify" in refused(obj, verifier=Verifier(v.keys, "other-federation"))
    # a nonce that is right but copied into a forged body still fails; a bad signature length too
    assert "64 bytes" in refused(dict(obj, signature=b"x" * 63))


def test_keys_generate_cli_and_config_keys(tmp_path, capsys):
    assert cli_main(["keys", "generate", "--device-id", "dev-0", "--out", str(tmp_path / "keys")]) == 0
    out = capsys.readouterr().out
    key, pub = tmp_path / "keys" / "dev-0.key", tmp_path / "keys" / "dev-0.pub"
    assert key.stat().st_mode & 0o077 == 0, "private key must be owner-only"
    assert pub.read_text().strip() in out and "device_keys:" in out
    # refuses to overwrite without --force
    assert cli_main(["keys", "generate", "--device-id", "dev-0", "--out", str(tmp_path / "keys")]) == 2
    signer = Signer.from_file(key)
    assert signer.public_key_b64 == pub.read_text().strip()

    cfg = validate_config({"device_keys": {"dev-0": str(pub), "dev-1": generate_keypair()[1]}}, CoordinatorConfig)
    assert cfg.signatures_required
    assert not validate_config({"device_keys": {"dev-0": str(pub)}, "require_signatures": False},
                               CoordinatorConfig).signatures_required
    assert not validate_config({}, CoordinatorConfig).signatures_required
    with pytest.raises(ConfigError, match=r"device_keys\.dev-2"):
        validate_config({"device_keys": {"dev-2": "not-a-key"}}, CoordinatorConfig)
    with pytest.raises(ConfigError, match=r"device_keys\.dev-2"):
        validate_config({"device_keys": {"dev-2": base64.b64encode(b"x" * 31).decode()}}, CoordinatorConfig)
    with pytest.raises(ConfigError, match="require_signatures needs device_keys"):
        validate_config({"require_signatures": True}, CoordinatorConfig)

    train = tmp_path / "t.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    agent = {"device_id": "dev-0", "model": "tiny-llama", "data": {"train": str(train)}}
    assert validate_config(dict(agent, signing_key=str(key)), AgentConfig).signing_key == key
    with pytest.raises(ConfigError, match="signing_key"):
        validate_config(dict(agent, signing_key=str(pub)), AgentConfig)  # a public key is no signing key
    with pytest.raises(ConfigError, match="signing_key"):
        validate_config(dict(agent, signing_key=str(tmp_path / "missing.key")), AgentConfig)


PASSWORDS = {"coordinator": "c-pass", "dev-0": "d0-pass", "dev-1": "d1-pass"}


def test_device_with_broker_credentials_cannot_update_as_another_device(mosquitto, tmp_path):
    """dev-1 logs in with its own valid credentials (the broker has no per-device ACL) and
    publishes updates naming dev-0 on dev-0's topic: signed with its own key, unsigned, and dev-0's
    earlier signed update replayed or re-targeted at the new round. All are refused; the globals
    are exactly the honest devices' average."""
    broker = mosquitto(users=PASSWORDS, allow_anonymous=True)  # observers read anonymously
    s0, pub0 = _signer(tmp_path, "dev-0")
    s1, pub1 = _signer(tmp_path, "dev-1")
    (tmp_path / "dev-0.pub").write_text(pub0 + "\n")
    coord_cfg = coordinator_config(
        tmp_path, broker.url, rounds=2, min_clients=2, evaluate=False, round_deadline_s=60,
        broker={"username": "coordinator", "password": PASSWORDS["coordinator"]},
        device_keys={"dev-0": str(tmp_path / "dev-0.pub"), "dev-1": pub1},
    )
    bad = np.float32(100.0)
    attempts: list[str] = []

    def forge(dev: FakeDevice, task: m.Task) -> None:
        forged_delta = {k: np.full_like(a, bad) for k, a in dev.adapter.items()}
        # 1. an update naming dev-0, signed with dev-1's own key
        dev.publish_update(msgpack.packb(update_obj(task, "dev-0", forged_delta, federation="test", signer=s1),
                                         use_bin_type=True), device_topic="dev-0")
        # 2. the same, unsigned
        dev.publish_update(msgpack.packb(update_obj(task, "dev-0", forged_delta, federation="test"),
                                         use_bin_type=True), device_topic="dev-0")
        attempts.extend(["other key", "unsigned"])
        if task.round == 2 and honest.sent:
            # 3. dev-0's round-1 update replayed verbatim (another task: refused as not open)
            old = next(p for p in honest.sent if msgpack.unpackb(p, raw=False)["task_id"].startswith("r1-fit"))
            dev.publish_update(old, device_topic="dev-0")
            # 4. its signature kept, but the body re-targeted at this round's task and nonce
            obj = msgpack.unpackb(old, raw=False)
            obj.update(task_id=task.task_id, round=task.round, base_version=task.global_version, nonce=task.nonce)
            dev.publish_update(msgpack.packb(obj, use_bin_type=True), device_topic="dev-0")
            attempts.extend(["replay", "retargeted"])
        time.sleep(0.5)  # the forgeries are handled while the round is still open

    honest = FakeDevice(broker.url, "dev-0", signer=s0, username="dev-0", password=PASSWORDS["dev-0"])
    mallory = FakeDevice(broker.url, "dev-1", signer=s1, username="dev-1", password=PASSWORDS["dev-1"],
                         before_fit_answer=forge)
    capture = Capture(broker.url, Topics("fedmq", "test"))  # an anonymous observer
    try:
        capture.start()
        honest.start()
        mallory.start()
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
        rc = coord.wait(timeout=120)
        log = (tmp_path / "coord.log").read_text()
        assert rc == 0, log[-3000:]
        status = read_retained_json(broker.url, Topics("fedmq", "test").coordinator_status, m.CoordinatorStatus)
        time.sleep(0.3)
    finally:
        if "coord" in locals():
            stop_all([coord])
        honest.close()
        mallory.close()
        capture.close()

    assert attempts == ["other key", "unsigned", "other key", "unsigned", "replay", "retargeted"]
    assert "signature does not verify with the device's key" in log
    assert "update from dev-0 is not signed" in log
    assert "is not open; refused" in log  # the verbatim replay
    assert "Traceback" not in log
    c = status.counters
    assert c["signature_rejected"] == 5, c  # 2 + 2 + the re-targeted replay
    assert c["updates_rejected"] == 6, c
    assert c["errors"] == 0 and c["updates_accepted"] == 5, c  # init + 2 rounds x 2 devices
    # the globals are the honest average: both devices sent +0.01 everywhere each round
    assert sorted(capture.weights) == [0, 1, 2]
    for name, w0 in capture.weights[0].items():
        np.testing.assert_allclose(capture.weights[2][name], w0 + np.float32(0.02), atol=1e-6)


def test_unsigned_agent_is_refused_and_agent_signs_with_nonce(tmp_path):
    """The agent side: EdgeAgent._send signs with the task's nonce (no broker: a stub transport)."""
    from edge_agent.agent import EdgeAgent

    _, pub0 = _signer(tmp_path, "dev-0")
    train = tmp_path / "t.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = AgentConfig(device_id="dev-0", model="tiny-llama", data={"train": train}, state_dir=tmp_path / "st",
                      signing_key=tmp_path / "dev-0.key", federation="test")
    sent: list[tuple[str, bytes]] = []

    class StubTransport:
        bytes_sent = bytes_received = 0

        def publish(self, topic, payload, **kw):
            sent.append((topic, payload))
            return Published(len(payload), 0)

    agent = EdgeAgent(cfg, transport=StubTransport())
    task = _task(kind="fit")
    delta = {k: np.full_like(a, 0.25) for k, a in tiny_adapter().items()}
    agent._send(task, task.global_version, 5, {"train_loss": 1.0, "bad": float("nan")}, delta)
    (topic, payload), = sent
    assert topic == Topics("fedmq", "test").device_update("dev-0")
    upd = m.Update.from_msgpack(payload)
    assert upd.nonce == task.nonce and upd.signature is not None and "bad" not in upd.metrics
    Verifier({"dev-0": load_public_key(pub0)}, "test").verify(upd.to_obj(), task.nonce)
