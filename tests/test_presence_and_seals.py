"""Presence that cannot go backwards, sealed coordinator messages, bounded intake and rate-limited
refusal logs (the parts the hostile-network tests exercise end to end, one at a time)."""

from __future__ import annotations

import logging
import random
import time

import pytest

from broker_coordinator.coordinator import INBOX_LIMITS, Inbox
from broker_coordinator.registry import DeviceRegistry
from edge_agent.agent import EVENT_QUEUE_LIMITS, EventQueues
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.rejections import RejectionLog
from fedmq_protocol.seal import Sealer, SealOpener
from fedmq_protocol.signing import Signer, Verifier, generate_keypair, load_public_key
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport.client import refuses_mqtt5

TOPICS = Topics("fedmq", "t")
TOPIC = TOPICS.device_status("d1")


def status(state: str = "idle", *, seq: int = 1, conn: int = 1, counter: int = 2, online: bool = True,
           will: bool = False) -> bytes:
    return m.DeviceStatus(device_id="d1", online=online, seq=seq, conn=conn, counter=counter, will=will,
                          state=state if online else "offline", num_samples=5).to_json()


def test_no_replay_or_redelivery_moves_a_device_back():
    reg = DeviceRegistry({}, TOPICS, offline_grace_s=0)
    loading, idle = status("loading", counter=2), status("idle", counter=3)
    assert reg.on_status(TOPIC, loading) and reg.on_status(TOPIC, idle)
    assert reg.devices["d1"].ready
    for stale in (loading, idle):  # an unchanged replay of an earlier status, a QoS 1 redelivery
        assert reg.on_status(TOPIC, stale) is None
    assert reg.devices["d1"].state == "idle" and reg.replays_ignored == 2
    # the Will of this connection ends it (its counter was reserved at connect, before the births)
    will = status(online=False, conn=1, counter=0, will=True)
    assert reg.on_status(TOPIC, will, arrived_at=1234.5).online is False
    assert reg.devices["d1"].last_seen == 1234.5  # dated by its arrival, not by its connect-time ts
    assert reg.on_status(TOPIC, idle) is None and reg.on_status(TOPIC, will) is None  # replays
    # the next connection of the same process: births above the Will
    back = reg.on_status(TOPIC, status("idle", conn=4, counter=5))
    assert back.online and back.back and reg.devices["d1"].ready
    # a new process (seq 2) is later than anything of seq 1
    assert reg.on_status(TOPIC, status("training", seq=2, conn=1, counter=2)) is not None
    assert reg.on_status(TOPIC, status("idle", seq=1, conn=9, counter=99)) is None


def test_a_status_not_refreshed_ages_out_of_ready():
    reg = DeviceRegistry({}, TOPICS, offline_grace_s=0, status_max_age_s=30)
    reg.on_status(TOPIC, status(), arrived_at=time.time() - 60)
    assert reg.devices["d1"].ready and not reg.ready()
    reg.on_status(TOPIC, status(counter=3), arrived_at=time.time())
    assert [d.device_id for d in reg.ready()] == ["d1"]


def test_signed_statuses_required_refuse_unsigned_and_forged(tmp_path):
    pem, pub = generate_keypair()
    (tmp_path / "k").write_bytes(pem)
    signer = Signer.from_file(tmp_path / "k")
    verifier = Verifier({"d1": load_public_key(pub)}, "t")
    reg = DeviceRegistry({}, TOPICS, offline_grace_s=0, verifier=verifier, signatures_required=True)
    st = m.DeviceStatus(device_id="d1", online=True, seq=1, conn=1, counter=2, state="idle", num_samples=5)
    signed = st.model_copy(update={"signature": signer.sign_status("t", st.model_dump(
        by_alias=True, mode="json", exclude_none=True))})
    with pytest.raises(ProtocolError, match="not signed"):
        reg.on_status(TOPIC, st.to_json())
    forged = signed.model_copy(update={"state": "loading", "counter": 3})
    with pytest.raises(ProtocolError, match="does not verify"):
        reg.on_status(TOPIC, forged.to_json())
    assert reg.on_status(TOPIC, signed.to_json()).online
    assert m.DeviceStatus.from_json(signed.to_json()) == signed  # the signature survives JSON


def test_sealed_messages_refuse_mutations_replays_and_other_topics():
    sealer, opener = Sealer("t"), SealOpener("t")
    topic = TOPICS.device_task("d1")
    first = sealer.seal(topic, b"task-1", round_no=1, version=0)
    second = sealer.seal(topic, b"task-2", round_no=1, version=0)
    assert opener.open(topic, b"bare bytes").counter is None  # unsealed: taken until a seal is seen
    assert opener.open(topic, first).body == b"task-1"
    assert opener.open(topic, first) is None  # an unchanged replay
    assert opener.open(topic, second).body == b"task-2"
    assert opener.open(topic, first) is None and opener.replays == 2  # an earlier one
    with pytest.raises(ProtocolError, match="not sealed"):
        opener.open(topic, b"bare bytes")  # after a seal: unsealed payloads are refused
    with pytest.raises(ProtocolError, match="arrived on"):
        opener.open(TOPICS.device_task("d2"), sealer.seal(topic, b"x", round_no=1, version=0))
    rng = random.Random(0)
    payload = sealer.seal(topic, b"a task body of some length", round_no=2, version=1)
    for _ in range(300):  # any bit flip anywhere is refused
        b = bytearray(payload)
        b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        fresh = SealOpener("t")
        fresh.open(TOPICS.global_model, sealer.seal(TOPICS.global_model, b"g", round_no=0, version=0))
        with pytest.raises(ProtocolError):
            fresh.open(topic, bytes(b))


def test_signed_seals_verify_with_the_coordinator_key_only(tmp_path):
    pem, pub = generate_keypair()
    (tmp_path / "c").write_bytes(pem)
    other_pem, _ = generate_keypair()
    (tmp_path / "o").write_bytes(other_pem)
    topic = TOPICS.global_model
    real = Sealer("t", Signer.from_file(tmp_path / "c")).seal(topic, b"global", round_no=1, version=1)
    forged = Sealer("t", Signer.from_file(tmp_path / "o")).seal(topic, b"global", round_no=1, version=2)
    unsigned = Sealer("t").seal(topic, b"global", round_no=1, version=3)
    opener = SealOpener("t", load_public_key(pub), require_signatures=True)
    with pytest.raises(ProtocolError, match="does not verify"):
        opener.open(topic, forged)
    with pytest.raises(ProtocolError, match="not signed"):
        opener.open(topic, unsigned)
    with pytest.raises(ProtocolError, match="not sealed"):
        opener.open(topic, b"\x81\xa6schema\x01")
    assert opener.open(topic, real).signed
    with pytest.raises(ProtocolError, match="check does not match"):  # sealed for another federation
        SealOpener("other").open(topic, real)


def test_refusals_are_counted_per_topic_and_logged_at_a_bounded_rate(caplog):
    rl = RejectionLog(logging.getLogger("test.rejections"), every_s=60)
    with caplog.at_level(logging.WARNING, logger="test.rejections"):
        for i in range(1000):
            rl.add("fedmq/t/devices/d1/status", f"invalid DeviceStatus: not JSON (char {i})")
        rl.add("fedmq/t/devices/d2/update", "update for task 'r1' is not open")
    assert rl.total == 1001 and rl.by_topic["fedmq/t/devices/d1/status"] == 1000
    assert rl.by_reason["invalid DeviceStatus: not JSON (char _)"] == 1000
    assert len(caplog.records) == 2  # one line per topic (one kind of reason each)


def test_intake_queues_are_bounded_per_class_and_awaited_updates_never_dropped():
    inbox = Inbox()
    for i in range(INBOX_LIMITS["update"] + 50):
        inbox.put("update", ("update", "junk", b"x", float(i)))
    for i in range(500):
        assert inbox.put("awaited", ("update", "real", b"u", float(i)))
    assert inbox.dropped == {"update": 50}
    assert inbox.get(0)[1] == "real"  # awaited updates are taken before junk
    agent = EventQueues()
    for _ in range(EVENT_QUEUE_LIMITS["own_status"] + 5):
        agent.put(("own_status", "t", b"{}", 0.0))
    agent.put(("task", "t", b"task", 0.0))
    assert agent.dropped == {"own_status": 5} and agent.qsize() == EVENT_QUEUE_LIMITS["own_status"] + 1


def test_a_broker_that_refuses_mqtt5_is_recognised():
    assert refuses_mqtt5("cannot connect to mqtt://h:1 as 'a': connection closed before CONNACK (x)")
    assert refuses_mqtt5("refused by broker: Unsupported protocol version (reason code 132)")
    assert not refuses_mqtt5("cannot connect: TLS failure (before CONNACK)")
    assert not refuses_mqtt5("not authorized: broker says 'Not authorized'")


class _Recorder:
    """A transport that records what the agent publishes."""

    connected = True
    messages_rejected = 0

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.wills: list[bytes] = []

    def publish(self, topic, payload, **kw):
        from fedmq_protocol.transport import Published

        self.published.append((topic, bytes(payload)))
        return Published(len(payload), 0)

    def set_will(self, will) -> None:
        self.wills.append(will.payload)


def test_an_agent_replaces_a_forged_status_on_its_topic_and_steps_above_it(tmp_path):
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig

    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    rec = _Recorder()
    agent = EdgeAgent(AgentConfig(device_id="d1", model="tiny-llama", data={"train": train}, federation="t",
                                  state_dir=tmp_path / "agent"), transport=rec)
    agent.state = "idle"
    agent.announce()
    mine = m.DeviceStatus.from_json(rec.published[-1][1])
    assert m.DeviceStatus.from_json(agent._will().payload).will  # the Will says it is one
    forged = mine.model_copy(update={"seq": mine.seq + 7, "state": "loading", "counter": 10**6})
    agent._events.put(("own_status", TOPIC, forged.to_json(), time.time()))
    agent._pump(0)
    again = m.DeviceStatus.from_json(rec.published[-1][1])
    assert again.order > forged.order and again.state == "idle"
    assert agent.rejected == {"own_status": 1} and agent.status_forged == 1
    assert m.DeviceStatus.from_json(rec.wills[-1]).order > forged.order  # the next connection's Will
    reg = DeviceRegistry({}, TOPICS, offline_grace_s=0)  # as the coordinator sees the sequence
    for payload in (mine.to_json(), forged.to_json(), rec.published[-1][1]):
        reg.on_status(TOPIC, payload)
    assert reg.devices["d1"].state == "idle"
    n = len(rec.published)
    agent._events.put(("own_status", TOPIC, mine.to_json(), time.time()))  # an older one of ours
    agent._pump(0)
    assert len(rec.published) == n and agent.status_forged == 1


def test_seal_wire_format_is_the_documented_one():
    """docs/protocol.md "Sealed coordinator messages", computed independently of fedmq's code."""
    import hashlib

    import msgpack

    body = m.Task(kind="fit", task_id="r1-fit-v0-a0", round=1, device_id="d1", global_version=0, deadline_s=60,
                  adapter=m.AdapterSpec()).to_msgpack()
    topic = TOPICS.device_task("d1")
    sealed = Sealer("t", start=41).seal(topic, body, round_no=1, version=0)
    obj = msgpack.unpackb(sealed, raw=False)
    assert list(obj) == ["fedmq_sealed", "topic", "round", "version", "counter", "body", "check"]
    signed = b"fedmq-coordinator-seal-v1\x00" + msgpack.packb(
        ["t", topic, 1, 0, 42, hashlib.sha256(body).digest()], use_bin_type=True)
    assert obj == {"fedmq_sealed": 1, "topic": topic, "round": 1, "version": 0, "counter": 42, "body": body,
                   "check": hashlib.sha256(signed).digest()}
    assert m.Task.from_msgpack(obj["body"]).task_id == "r1-fit-v0-a0"  # the message bytes, unchanged
