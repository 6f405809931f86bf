"""MqttTransport against a real Mosquitto 2 (see conftest.py)."""

from __future__ import annotations

import os
import threading
import time
import uuid

import msgpack
import pytest
from mosquitto import free_port
from pydantic import ValidationError

from fedmq_protocol.chunking import frame_payload
from fedmq_protocol.transport import BrokerConfig, MqttClient, MqttTransport, Published, TransportError, WillMessage


class Inbox:
    def __init__(self) -> None:
        self.items: list[tuple[str, bytes]] = []
        self.cond = threading.Condition()

    def __call__(self, topic: str, payload: bytes) -> None:
        with self.cond:
            self.items.append((topic, payload))
            self.cond.notify_all()

    def wait(self, n: int = 1, timeout: float = 5.0) -> list[tuple[str, bytes]]:
        deadline = time.monotonic() + timeout
        with self.cond:
            while len(self.items) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
            return list(self.items)


@pytest.fixture
def transports():
    made: list[MqttTransport] = []

    def make(config: BrokerConfig, client_id: str | None = None, **kw) -> MqttTransport:
        t = MqttTransport(config, client_id or f"t-{uuid.uuid4().hex[:8]}", **kw)
        made.append(t)
        return t

    yield make
    for t in made:
        t.close()


def test_framed_5mb_through_64k_broker_limit(mosquitto, transports):
    broker = mosquitto(message_size_limit=64 * 1024)
    cfg = BrokerConfig(url=broker.url, chunk_size=32 * 1024)
    inbox = Inbox()
    sub = transports(cfg)
    sub.connect()
    sub.subscribe("fedmq/f/devices/d1/update", inbox, framed=True)
    pub = transports(cfg)
    pub.connect()
    payload = os.urandom(5 * 1024 * 1024)
    sent = pub.publish("fedmq/f/devices/d1/update", payload, framed=True)
    assert sent.bytes > len(payload)
    got = inbox.wait(1, timeout=20)
    assert got == [("fedmq/f/devices/d1/update", payload)]
    assert sub.bytes_received == sent.bytes
    assert sub.messages_rejected == 0

    # The same payload unframed exceeds the broker limit and never arrives.
    with pytest.raises(TransportError):
        pub.publish("fedmq/f/devices/d1/update", payload, timeout=1.5)
    time.sleep(0.5)
    assert len(inbox.items) == 1
    # The refused message was dropped from the client queue: the publisher recovers.
    assert pub.wait_connected(5)
    pub.publish("fedmq/f/devices/d1/update", b"small", framed=True)
    assert inbox.wait(2)[1] == ("fedmq/f/devices/d1/update", b"small")


def test_retained_chunked_message_reaches_late_subscriber(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url, chunk_size=4096)
    pub = transports(cfg)
    pub.connect()
    first, second = os.urandom(40_000), os.urandom(9_000)
    pub.publish("fedmq/f/global", first, retain=True, framed=True)
    pub.publish("fedmq/f/global", second, retain=True, framed=True)  # 3 chunks: 7 stale cleared
    inbox = Inbox()
    late = transports(cfg)
    late.connect()
    late.subscribe("fedmq/f/global", inbox, framed=True)
    assert inbox.wait(1) == [("fedmq/f/global", second)]

    # Stale higher-index chunk topics were cleared: a raw subscriber sees only 3 retained chunks.
    raw = Inbox()
    spy = transports(cfg)
    spy.connect()
    spy.subscribe("fedmq/f/global/c/+", raw)
    time.sleep(0.5)
    assert sorted(t for t, _ in raw.items) == [f"fedmq/f/global/c/{i}" for i in range(3)]

    pub.clear_retained("fedmq/f/global")
    again = Inbox()
    late2 = transports(cfg)
    late2.connect()
    late2.subscribe("fedmq/f/#", again)
    time.sleep(0.5)
    assert again.items == []


def test_resubscribes_after_broker_restart(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url, reconnect_min_s=0.1, reconnect_max_s=0.5)
    inbox = Inbox()
    sub = transports(cfg)
    reconnects = []
    sub.on_connect.append(lambda session_present: reconnects.append(session_present))
    sub.connect()
    sub.subscribe("a/b", inbox, framed=True)
    pub = transports(cfg)
    pub.connect()
    pub.publish("a/b", b"one", framed=True)
    assert inbox.wait(1)[0] == ("a/b", b"one")

    mqtt_broker.restart()  # persistence off: the broker forgets every session
    assert sub.wait_connected(10) and pub.wait_connected(10)
    deadline = time.monotonic() + 10
    while len(reconnects) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(reconnects) == 2 and sub.disconnects == 1
    time.sleep(0.2)  # let the re-SUBSCRIBE made in on_connect be acknowledged
    payload = os.urandom(1_000_000)
    pub.publish("a/b", payload, framed=True)
    assert inbox.wait(2)[1] == ("a/b", payload)


def test_connect_to_closed_port_fails_fast_with_url():
    url = f"mqtt://127.0.0.1:{free_port()}"
    t = MqttTransport(BrokerConfig(url=url), "nobody")
    start = time.monotonic()
    with pytest.raises(TransportError) as ei:
        t.connect(timeout=3)
    assert time.monotonic() - start < 3.5
    msg = str(ei.value)
    assert url in msg and "refused" in msg and "\n" not in msg
    t.close()


def test_bad_password_is_an_authorization_error(mosquitto, transports):
    broker = mosquitto(users={"alice": "s3cret"})
    ok = transports(BrokerConfig(url=broker.url, username="alice", password="s3cret"))
    ok.connect(timeout=5)
    assert ok.connected
    for version in ("5", "3.1.1"):
        bad = transports(
            BrokerConfig(url=broker.url, username="alice", password="wrong", mqtt_version=version)
        )
        with pytest.raises(TransportError, match=r"(?i)authoriz") as ei:
            bad.connect(timeout=5)
        assert broker.url in str(ei.value)
        assert not bad.connected


def test_password_file(mosquitto, transports, tmp_path):
    broker = mosquitto(users={"bob": "pw-from-file"})
    pw = tmp_path / "pw"
    pw.write_text("pw-from-file\n")
    t = transports(BrokerConfig(url=broker.url, username="bob", password_file=pw))
    t.connect(timeout=5)
    assert t.connected


def test_acl_denied_publish_is_reported(mosquitto, transports):
    broker = mosquitto(users={"dev": "pw"}, acl="user dev\ntopic readwrite allowed/#\n")
    t = transports(BrokerConfig(url=broker.url, username="dev", password="pw"))
    t.connect(timeout=5)
    inbox = Inbox()
    t.subscribe("allowed/#", inbox)
    t.publish("allowed/x", b"ok")
    # MQTT 5: Mosquitto answers a denied QoS 1 publish with PUBACK "Not authorized".
    with pytest.raises(TransportError, match=r"(?i)rejected publish.*not authori"):
        t.publish("forbidden/x", b"nope")
    assert t.publish_failures == 1 and t.connected
    assert inbox.wait(1) == [("allowed/x", b"ok")]


def test_tls_with_generated_certs(mosquitto, transports):
    broker = mosquitto(tls=True)
    assert broker.url.startswith("mqtts://")
    files = broker.tls_files
    cfg = BrokerConfig(url=broker.url, ca_file=files.ca_file)
    inbox = Inbox()
    sub = transports(cfg)
    sub.connect(timeout=5)
    sub.subscribe("secure/t", inbox, framed=True)
    pub = transports(cfg)
    pub.connect(timeout=5)
    payload = os.urandom(600_000)
    pub.publish("secure/t", payload, framed=True)
    assert inbox.wait(1) == [("secure/t", payload)]

    # Without the CA the server certificate does not verify.
    wrong = transports(BrokerConfig(url=broker.url))
    with pytest.raises(TransportError, match="TLS"):
        wrong.connect(timeout=5)


def test_tls_client_certificate(mosquitto, transports):
    broker = mosquitto(tls=True, require_certificate=True)
    f = broker.tls_files
    t = transports(
        BrokerConfig(url=broker.url, ca_file=f.ca_file, cert_file=f.client_cert, key_file=f.client_key)
    )
    t.connect(timeout=5)
    assert t.connected


def test_handler_exception_does_not_kill_loop(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url)
    inbox = Inbox()
    calls = []

    def boom(topic, payload):
        calls.append(payload)
        raise RuntimeError("handler bug")

    sub = transports(cfg)
    sub.connect()
    sub.subscribe("x/boom", boom)
    sub.subscribe("x/ok", inbox, framed=True)
    pub = transports(cfg)
    pub.connect()
    pub.publish("x/boom", b"1")
    pub.publish("x/boom", b"2")
    pub.publish("x/ok", b"fine", framed=True)
    assert inbox.wait(1) == [("x/ok", b"fine")]
    assert calls == [b"1", b"2"] and sub.handler_errors == 2
    assert sub.connected


def test_malformed_frames_are_counted_not_fatal(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url)
    inbox = Inbox()
    sub = transports(cfg)
    sub.connect()
    sub.subscribe("m/t", inbox, framed=True)
    pub = transports(cfg)
    pub.connect()
    pub.publish("m/t", msgpack.packb({"fedmq_manifest": 1, "size": 5}))  # a manifest missing its fields
    pub.publish("m/t/c/0", b"garbage")  # not a chunk
    pub.publish("m/t", b"good", framed=True)
    assert inbox.wait(1) == [("m/t", b"good")]
    assert sub.messages_rejected == 2 and sub.connected
    assert sub.stats()["messages_rejected"] == 2 and sub.last_reject_reason


def test_chunk_size_capped_by_broker_maximum_packet_size(mosquitto, transports):
    broker = mosquitto(max_packet_size=16 * 1024)
    cfg = BrokerConfig(url=broker.url, chunk_size=64 * 1024)
    inbox = Inbox()
    sub = transports(cfg)
    sub.connect()
    sub.subscribe("big/#", inbox, framed=True)
    pub = transports(cfg)
    pub.connect()
    assert pub.max_packet_size == 16 * 1024
    assert pub.effective_chunk_size("big/t") < 16 * 1024
    payload = os.urandom(300_000)
    pub.publish("big/t", payload, framed=True)
    assert inbox.wait(1) == [("big/t", payload)]
    with pytest.raises(TransportError, match="Maximum-Packet-Size"):
        pub.publish("big/t", payload)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_persistent_session_delivers_messages_queued_while_away(mqtt_broker, transports, version):
    cfg = BrokerConfig(url=mqtt_broker.url, mqtt_version=version)
    inbox = Inbox()
    dev = transports(cfg, "device-7")
    dev.subscribe("tasks/device-7", inbox, framed=True)  # made on connect
    dev.connect()
    dev.close()
    pub = transports(cfg)
    pub.connect()
    pub.publish("tasks/device-7", b"while you were away", framed=True)
    back = transports(cfg, "device-7")
    back.subscribe("tasks/device-7", inbox, framed=True)
    back.connect()
    assert back.session_present
    assert inbox.wait(1) == [("tasks/device-7", b"while you were away")]


def test_will_published_on_abrupt_loss_not_on_close(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url, keepalive_s=5)
    inbox = Inbox()
    watcher = transports(cfg)
    watcher.connect()
    watcher.subscribe("status/+", inbox)
    clean = transports(cfg, "clean", will=WillMessage("status/clean", b'{"online":false}', 1, False))
    clean.connect()
    clean.close()
    abrupt = transports(cfg, "abrupt", will=WillMessage("status/abrupt", b'{"online":false}', 1, False))
    abrupt.connect()
    abrupt.client._paho.socket().close()  # simulate a vanished device
    got = inbox.wait(1, timeout=10)
    assert got == [("status/abrupt", b'{"online":false}')]


def test_config_validation(tmp_path):
    with pytest.raises(ValidationError, match="scheme"):
        BrokerConfig(url="http://x:1")
    with pytest.raises(ValidationError, match="port"):
        BrokerConfig(url="mqtt://x:99999")
    with pytest.raises(ValidationError, match="ca_file"):
        BrokerConfig(url="mqtts://x:8883", ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValidationError, match="not mqtts"):
        (tmp_path / "ca.pem").write_text("x")
        BrokerConfig(url="mqtt://x:1883", ca_file=tmp_path / "ca.pem")
    with pytest.raises(ValidationError):
        BrokerConfig(chunk_size=10)
    with pytest.raises(ValidationError):
        BrokerConfig(unknown=1)
    c = BrokerConfig(url="mqtts://broker.example")
    assert (c.host, c.port, c.tls) == ("broker.example", 8883, True)


# -- publish results, per-message completions, the network thread ----------------------------------


def test_publish_returns_the_chunk_count_of_a_payload_larger_than_chunk_size(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url, chunk_size=4096)
    inbox = Inbox()
    sub = transports(cfg)
    sub.connect()
    sub.subscribe("p/t", inbox, framed=True)
    pub = transports(cfg)
    pub.connect()
    payload = os.urandom(3 * 4096 + 100)

    sent = pub.publish("p/t", payload, framed=True)

    assert sent.chunks == 4 == len(frame_payload(payload, 4096)) - 1  # the manifest is not a chunk
    assert inbox.wait(1) == [("p/t", payload)]
    assert sent.bytes == sub.bytes_received > len(payload)
    assert pub.publish("p/t", b"small", framed=True) == Published(bytes=5, chunks=0)  # the message as is
    assert pub.publish("p/raw", b"raw") == Published(bytes=3, chunks=0)


def test_retained_publish_counts_its_own_chunks_not_the_stale_ones_it_clears(mqtt_broker, transports):
    pub = transports(BrokerConfig(url=mqtt_broker.url, chunk_size=4096))
    pub.connect()
    assert pub.publish("r/t", os.urandom(40_000), retain=True, framed=True).chunks == 10
    assert pub.publish("r/t", os.urandom(9_000), retain=True, framed=True).chunks == 3


def test_subscriptions_made_before_connect_are_in_place_when_connect_returns(mqtt_broker, transports):
    """Another client's message published right after connect() returns is not lost to a SUBSCRIBE
    the broker has not processed yet: connect() waits for its SUBACK."""
    cfg = BrokerConfig(url=mqtt_broker.url)
    inbox = Inbox()
    sub = transports(cfg)
    filters = [f"early/{i}" for i in range(50)]
    for f in filters:
        sub.subscribe(f, inbox)
    sub.connect()
    assert sub.client.pending_messages == 0  # the SUBACK is in
    pub = transports(cfg)
    pub.connect()
    for f in filters:
        pub.publish(f, b"x")
    assert sorted(t for t, _ in inbox.wait(len(filters))) == sorted(filters)


def test_client_publish_returns_a_future_completed_by_the_acknowledgement(mqtt_broker):
    client = MqttClient(BrokerConfig(url=mqtt_broker.url), f"c-{uuid.uuid4().hex[:8]}")
    try:
        client.connect()
        done = client.publish("f/t", b"x", qos=1)
        assert not done.result(timeout=5).is_failure
        assert client.pending_messages == 0
    finally:
        client.close()


def test_no_message_id_is_left_pending_after_a_publish_times_out_when_the_broker_stops(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url, chunk_size=4096, reconnect_min_s=0.1, reconnect_max_s=0.5)
    stopped = threading.Event()

    def stop_broker_at_the_first_chunk(topic: str, payload: bytes) -> None:
        if not stopped.is_set():
            stopped.set()
            mqtt_broker.stop()

    watcher = transports(cfg)
    watcher.connect()
    watcher.subscribe("slow/t/c/+", stop_broker_at_the_first_chunk)
    pub = transports(cfg)
    pub.connect()

    with pytest.raises(TransportError, match="not acknowledged"):
        pub.publish("slow/t", os.urandom(400_000), framed=True, timeout=2)  # ~100 chunks
    assert stopped.is_set()
    assert pub.client.pending_messages == 0
    assert pub.client.abandoned_messages > 0  # paho still holds them until the reconnect

    mqtt_broker.start()
    assert pub.wait_connected(10)
    assert pub.client.abandoned_messages == 0  # dropped at the reconnect, not re-sent
    pub.publish("slow/t", b"after", framed=True)
    assert pub.client.pending_messages == 0


def test_a_publish_awaited_across_the_reconnect_completes_while_an_abandoned_one_is_dropped(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url, reconnect_min_s=0.1, reconnect_max_s=0.5)
    pub = transports(cfg)
    pub.connect()
    mqtt_broker.stop()
    assert wait_for(lambda: not pub.connected)
    with pytest.raises(TransportError, match="not acknowledged"):
        pub.publish("given/up", b"abandoned", retain=True, timeout=0.5)
    outcome: list[object] = []
    waiter = threading.Thread(
        target=lambda: outcome.append(pub.publish("still/awaited", b"kept", retain=True, timeout=20)))
    waiter.start()
    assert wait_for(lambda: pub.client.pending_messages == 1)

    mqtt_broker.start()
    waiter.join(20)
    assert outcome == [Published(bytes=4, chunks=0)]
    assert pub.client.pending_messages == 0 and pub.client.abandoned_messages == 0
    retained = Inbox()
    late = transports(cfg)
    late.connect()
    late.subscribe("#", retained)
    time.sleep(0.5)
    assert retained.items == [("still/awaited", b"kept")]


def test_close_fails_a_waiting_publish_and_leaves_no_message_id_behind(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url, reconnect_min_s=0.1, reconnect_max_s=0.5)
    pub = transports(cfg)
    pub.connect()
    mqtt_broker.stop()
    assert wait_for(lambda: not pub.connected)
    errors: list[BaseException] = []

    def publish_while_the_broker_is_away() -> None:
        try:
            pub.publish("away/t", b"queued by paho", timeout=30)
        except TransportError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=publish_while_the_broker_is_away)
    waiter.start()
    assert wait_for(lambda: pub.client.pending_messages == 1)
    pub.close()
    waiter.join(5)
    assert not waiter.is_alive()
    assert len(errors) == 1 and "closed" in str(errors[0])
    assert pub.client.pending_messages == 0 and pub.client.abandoned_messages == 0


def test_publish_from_a_handler_or_hook_is_queued_not_awaited(mqtt_broker, transports):
    cfg = BrokerConfig(url=mqtt_broker.url, chunk_size=1024, max_inflight=2)
    replies = Inbox()
    listener = transports(cfg)
    listener.connect()
    listener.subscribe("reply/#", replies, framed=True)
    responder = transports(cfg)
    handler_returned = threading.Event()
    reply = os.urandom(20 * 1024)  # 20 chunks: more than max_inflight, so a waiting publish would block

    def answer(topic: str, payload: bytes) -> None:
        responder.publish("reply/handler", reply, framed=True)
        handler_returned.set()

    responder.on_connect.append(lambda session_present: responder.publish("reply/hook", reply, framed=True))
    responder.subscribe("ask", answer)
    responder.connect(timeout=5)  # the hook runs inside connect(), on the thread driving paho's loop
    asker = transports(cfg)
    asker.connect()
    asker.publish("ask", b"?")

    assert handler_returned.wait(5)
    got = dict(replies.wait(2, timeout=10))
    assert got == {"reply/hook": reply, "reply/handler": reply}
    assert wait_for(lambda: responder.client.pending_messages == 0)


def wait_for(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
