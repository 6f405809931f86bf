"""A hostile MQTT client for the tests: anonymous, subscribed to ``#``, and for as long as it runs
it republishes what it observed, unchanged (retained when it may have been) and mutated
(truncations, bit flips, huge msgpack lengths, NaN, wrong types, random bytes), at a fixed rate.

Every payload observed is queued for an unchanged replay; between replays it sends mutations of
observed payloads. The achieved rate and what was sent are measured, not assumed.
"""

from __future__ import annotations

import json
import random
import struct
import threading
import time
from collections import deque

import msgpack
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions

from tests import fuzzing as fz

MAX_KEPT = 4000  # distinct observed payloads kept for mutation (the most recent)


def _huge_lengths(rng: random.Random, data: bytes) -> bytes:
    """msgpack headers claiming far more than the payload holds."""
    head = rng.choice([b"\xdb\xff\xff\xff\xf0", b"\xc6\x7f\xff\xff\xff", b"\xdd\xff\xff\xff\xff",
                       b"\xdf\x7f\xff\xff\xff", b"\x81\xa6schema\xdc\xff\xff"])
    return head + data[: rng.randrange(0, 64)]


def _json_junk(rng: random.Random, data: bytes) -> bytes:
    try:
        obj = json.loads(data)
    except ValueError:
        obj = {"online": True}
    if isinstance(obj, dict) and obj:
        key = rng.choice(list(obj))
        obj[key] = rng.choice([float("nan"), float("inf"), "x", [], {}, None, -1, 2**70, True])
    return json.dumps(obj).encode()  # NaN and Infinity as JSON does not allow


def _wrong_types(rng: random.Random, data: bytes) -> bytes:
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not msgpack: junk instead
        obj = {"schema": 1}
    return fz.pack(fz.tree_mutate(rng, obj)) if isinstance(obj, (dict, list)) else fz.pack([obj, obj])


def mutate(rng: random.Random, data: bytes) -> bytes:
    r = rng.random()
    if not data or r < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randint(1, 200)))  # random bytes
    if r < 0.3:
        return data[: rng.randrange(len(data))]  # truncation
    if r < 0.5:
        b = bytearray(data)  # bit flips
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        return bytes(b)
    if r < 0.6:
        return _huge_lengths(rng, data)
    if r < 0.7:
        return fz.pack({"schema": 1, "version": float("nan"), "round": "1", "tensors": struct.pack("<d", float("nan"))})
    if r < 0.8 and data[:1] == b"{":
        return _json_junk(rng, data)
    return _wrong_types(rng, data) if len(data) < 200_000 else fz.byte_mutate(rng, data)


class HostileClient:
    """Subscribes to ``#`` and floods the broker with replays and mutations of what it sees."""

    def __init__(self, host: str, port: int, *, rate: float = 250.0, seed: int = 0):
        self.rate, self.rng = rate, random.Random(seed)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"mallory-{time.time_ns()}",
                                  protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(0)
        # no_local: what it observes is the federation's traffic, not its own junk
        self.client.on_connect = lambda c, u, f, rc, p=None: c.subscribe(
            "#", options=SubscribeOptions(qos=0, noLocal=True))
        self.client.on_message = self._on_message
        self.host, self.port = host, port
        self.lock = threading.Lock()
        self.kept: deque[tuple[str, bytes, bool]] = deque(maxlen=MAX_KEPT)
        self.to_replay: deque[tuple[str, bytes, bool, float]] = deque()
        self._seen: set[tuple[str, int]] = set()
        self.observed = 0
        self.observed_payloads = 0  # distinct (topic, payload) observed
        self.sent = 0
        self.replayed = 0  # unchanged copies of observed payloads
        self.mutated = 0
        self.observed_at: dict[tuple[str, int], float] = {}
        self.tasks: list[bytes] = []  # every task payload observed (whole: tasks are small)
        self.replayed_keys: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._flood, daemon=True)
        self.started = self.stopped = 0.0

    def _on_message(self, client, userdata, msg) -> None:
        payload = bytes(msg.payload)
        key = (msg.topic, hash(payload))
        with self.lock:
            self.observed += 1
            if key in self._seen or msg.topic.startswith("$"):
                return
            self._seen.add(key)
            if msg.topic.endswith("/task"):
                self.tasks.append(payload)
            self.observed_payloads += 1
            self.observed_at[key] = time.monotonic()
            # anything observed may have been retained: replay it both ways over the run
            retain = self.rng.random() < 0.5
            self.kept.append((msg.topic, payload, retain))
            self.to_replay.append((msg.topic, payload, retain, time.monotonic()))

    def start(self) -> HostileClient:
        self.client.connect(self.host, self.port, 60)
        self.client.loop_start()
        self.started = time.monotonic()
        self._thread.start()
        return self

    def _flood(self) -> None:
        period = 1.0 / self.rate
        next_at = time.monotonic()
        while not self._stop.is_set():
            with self.lock:
                item = self.to_replay.popleft() if self.to_replay and self.sent % 3 == 0 else None
                pick = self.kept[self.rng.randrange(len(self.kept))] if self.kept and item is None else None
            if item is not None:
                topic, payload, retain, _ = item
                self.replayed_keys.add((topic, hash(payload)))
                self.replayed += 1
            elif pick is not None:
                try:
                    payload = mutate(self.rng, pick[1])
                except (OverflowError, ValueError, TypeError, RecursionError):
                    payload = pick[1][::-1]  # a mutation msgpack cannot pack: the bytes reversed
                topic, retain = pick[0], pick[2] and self.rng.random() < 0.3
                self.mutated += 1
            else:
                topic, payload, retain = "fedmq/test/devices/dev-0/task", b"\xff" * 8, False
                self.mutated += 1
            self.client.publish(topic, payload, qos=0, retain=retain)
            self.sent += 1
            next_at += period
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # fell behind: do not burst to catch up

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.stopped = time.monotonic()
        self.client.loop_stop()
        self.client.disconnect()

    @property
    def achieved_rate(self) -> float:
        return self.sent / max(1e-9, (self.stopped or time.monotonic()) - self.started)

    def not_replayed(self, older_than_s: float) -> list[tuple[str, int]]:
        """Observed payloads (seen more than ``older_than_s`` before the end) never replayed."""
        end = self.stopped or time.monotonic()
        with self.lock:
            return [k for k, t in self.observed_at.items() if end - t > older_than_s and k not in self.replayed_keys]

