"""A simulated fleet: many devices on real MQTT connections, one event loop, no model.

Each simulated device is one paho client (one TCP connection to its broker) with its own Last
Will, retained signed status and task subscription, exactly as an agent has; all of them are
driven by ONE thread through paho's external-loop API (``socket()``, ``loop_read``,
``loop_write``, ``loop_misc`` and the socket open/close/register-write callbacks) over one
``selectors`` poller, so thousands of devices cost file descriptors, not threads or processes.

A device answers the coordinator's tasks with the messages an agent builds
(``edge_agent.updates.UpdateBuilder``: packed once, timing metrics, Ed25519 signature over the
fan-out's nonce): ``init`` with the adapter every device initialises (seeded, the same on all),
``fit`` with its difference, drawn from a seed and encoded by the agent's uplink encoder
(``edge_agent.uplink``; int2 by default) before the fleet connects, ``evaluate`` with a loss.
Statuses are refreshed every ``status_interval_s`` as an agent's are. What the coordinator
decodes is therefore known: :meth:`SimulatedFleet.expected_global` is the sample-weighted FedAvg
of the decoded differences (float64) added to the initial adapter.

The adapter's tensor names and shapes come from the model's ``config.json`` (:func:`lora_shapes`,
the names peft gives a LoRA on a Llama-family model), so no torch is needed here.

Devices may be spread over several brokers (``urls``): a hierarchical layout (site brokers
bridged to a central one) reuses the same fleet.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import selectors
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt

from edge_agent.updates import UpdateBuilder
from edge_agent.uplink import METRIC_KEYS, UplinkConfig, UplinkEncoder
from fedmq_protocol import messages as m
from fedmq_protocol.chunking import Reassembler, frame_payload
from fedmq_protocol.codec import EncodedTensors
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.seal import body_of
from fedmq_protocol.signing import Signer
from fedmq_protocol.topics import QOS_STATUS, QOS_TASK, QOS_UPDATE, Topics
from fedmq_protocol.transport.config import BrokerConfig
from fedmq_protocol.transport.connection import WillMessage, new_paho_client

Shapes = dict[str, tuple[int, ...]]

# the linear layers of a Llama-family block and where peft names them
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def lora_shapes(config: Mapping[str, Any], adapter: m.AdapterSpec) -> Shapes:
    """Name -> shape of every LoRA tensor peft creates for ``adapter`` on a Llama-family causal LM
    with this ``config.json`` (``base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight``:
    A is r x in, B is out x r)."""
    h = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    inter = int(config["intermediate_size"])
    dims = {"q_proj": (h, heads * head_dim), "k_proj": (h, kv * head_dim), "v_proj": (h, kv * head_dim),
            "o_proj": (heads * head_dim, h), "gate_proj": (h, inter), "up_proj": (h, inter),
            "down_proj": (inter, h)}
    unknown = [t for t in adapter.target_modules if t not in dims]
    if unknown:
        raise ValueError(f"adapter.target_modules {unknown} are not linear layers of a Llama block "
                         f"(known: {', '.join(dims)})")
    r = adapter.r
    out: Shapes = {}
    for i in range(int(config["num_hidden_layers"])):
        for name in (*_ATTN, *_MLP):
            if name not in adapter.target_modules:
                continue
            d_in, d_out = dims[name]
            prefix = f"base_model.model.model.layers.{i}.{'self_attn' if name in _ATTN else 'mlp'}.{name}"
            out[f"{prefix}.lora_A.weight"] = (r, d_in)
            out[f"{prefix}.lora_B.weight"] = (d_out, r)
    return out


def model_lora_shapes(model_dir: str | Path, adapter: m.AdapterSpec) -> Shapes:
    """:func:`lora_shapes` of the checkpoint in ``model_dir`` (its config.json)."""
    return lora_shapes(json.loads((Path(model_dir) / "config.json").read_text()), adapter)


def initial_adapter(shapes: Shapes, seed: int = 0) -> dict[str, np.ndarray]:
    """The adapter every device initialises: A small random (seeded), B zero, as LoRA starts."""
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s, dtype=np.float32) * 0.02 if ".lora_A." in k else np.zeros(s, np.float32))
            for k, s in shapes.items()}


def device_delta(shapes: Shapes, seed: int, index: int, scale: float = 1e-3) -> dict[str, np.ndarray]:
    """The difference device ``index`` trains (seeded by (seed, index): reproducible)."""
    rng = np.random.default_rng([seed, index])
    return {k: rng.standard_normal(s, dtype=np.float32) * np.float32(scale) for k, s in shapes.items()}


class PreEncodedUplink(UplinkEncoder):
    """The agent's uplink encoder whose encoding was done before the round (the fleet draws and
    encodes every device's difference up front, so answering a task costs no numerics)."""

    def __init__(self, encoded: EncodedTensors, metrics: dict[str, float]) -> None:
        super().__init__(UplinkConfig(error_feedback=False), None, None)
        self.encoded, self.metrics = encoded, metrics

    def encode(self, delta: Mapping[str, np.ndarray],
               size_of: Callable[[EncodedTensors], int]) -> tuple[EncodedTensors, dict[str, float]]:
        return self.encoded, dict(self.metrics)


@dataclass
class SimDevice:
    index: int
    device_id: str
    url: str
    num_samples: int
    signer: Signer | None
    builder: UpdateBuilder
    seq: int
    client: Any = None
    counter: int = 0
    connected: bool = False
    status_at: float = 0.0  # monotonic time of its last status
    tasks: list[str] = field(default_factory=list)  # task ids received, in order
    answered: set[str] = field(default_factory=set)
    task_at: float | None = None  # wall time the (last) fit task arrived
    sent_at: float | None = None  # wall time its update was handed to paho
    acked_at: float | None = None  # wall time the broker acknowledged every frame of it (PUBACK)
    pending_mids: set[int] = field(default_factory=set)


@dataclass(frozen=True)
class FleetTimes:
    """Wall-clock times of one fit fan-out, over the devices that answered it."""

    answered: int
    first_task: float
    last_task: float
    first_sent: float
    last_sent: float
    first_acked: float
    last_acked: float


class SimulatedFleet:
    """``n`` simulated devices on ``urls`` (spread round-robin), one event-loop thread.

    ``signed``: each device has an Ed25519 key (``public_keys()`` for the coordinator's
    ``device_keys``) and signs its statuses and updates. ``answer_delay``: seconds after a fit
    task arrives before device ``index`` answers (its training time; default: at once).
    ``distinct_updates``: how many different differences are drawn (device ``i`` sends number
    ``i % distinct_updates``; default one per device): large fleets are prepared faster, and
    every update is still decoded, checked and folded on its own by the coordinator.
    """

    def __init__(self, urls: Sequence[str], n: int, *, federation: str, shapes: Shapes, seed: int = 0,
                 signed: bool = True, uplink: UplinkConfig | None = None, delta_scale: float = 1e-3,
                 answer_delay: Callable[[int], float] | None = None, chunk_size: int = 256 * 1024,
                 id_prefix: str = "sim", connect_batch: int = 200, keepalive_s: int = 60,
                 distinct_updates: int | None = None, status_interval_s: float = 30.0) -> None:
        if n < 1 or not urls:
            raise ValueError("a fleet needs at least one device and one broker url")
        self.urls = list(urls)
        self.n = n
        self.federation = federation
        self.topics = Topics("fedmq", federation)
        self.shapes = shapes
        self.seed = seed
        self.uplink_cfg = uplink or UplinkConfig(values="int2", error_feedback=False)
        self.delta_scale = delta_scale
        self.answer_delay = answer_delay
        self.chunk_size = chunk_size
        self.connect_batch = connect_batch
        self.keepalive_s = keepalive_s
        self.status_interval_s = status_interval_s
        self._refresh_next = 0  # the device whose status is refreshed next (in connect order)
        self.init = initial_adapter(shapes, seed)
        self._sum: dict[str, np.ndarray] = {k: np.zeros(int(np.prod(s)), np.float64) for k, s in shapes.items()}
        self._total = 0
        self.update_bytes: list[int] = []
        self.devices: list[SimDevice] = []
        self.errors: list[str] = []
        self.distinct_updates = min(n, distinct_updates or n)
        self._prepare(n, id_prefix, signed, self.distinct_updates)
        self._sel = selectors.DefaultSelector()
        self._reassembler = Reassembler(max_message_bytes=1 << 26, max_pending_bytes=1 << 28, timeout_s=120)
        self._due: list[tuple[float, int, int, m.Task]] = []  # (when, order, device index, task)
        self._order = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.loop_cpu_s = 0.0

    # ------------------------------------------------------------------ preparation
    def _prepare(self, n: int, prefix: str, signed: bool, distinct: int) -> None:
        """Keys, sample counts, the encoded differences (``distinct`` of them: device ``i`` sends
        difference ``i % distinct``) and the expected sum."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        rng = np.random.default_rng([self.seed, 1 << 20])
        samples = rng.integers(8, 200, size=n)
        weight = np.bincount(np.arange(n) % distinct, weights=samples.astype(np.float64), minlength=distinct)
        seq0 = int(time.time() * 1000)
        probe = {"train_loss": 0.0, **dict.fromkeys(METRIC_KEYS, 0.0), "encode_s": 0.0, "sent_at": 0.0}
        uplinks: list[PreEncodedUplink] = []
        for k in range(distinct):
            delta = device_delta(self.shapes, self.seed, k, self.delta_scale)

            def size_of(enc: EncodedTensors) -> int:  # the agent's measure: the Update carrying it
                return len(m.Update(kind="fit", task_id="r1-fit-v0-a0", round=1, device_id=f"{prefix}-00000",
                                    base_version=0, num_samples=1, metrics=probe, tensors=enc).to_msgpack())

            enc, metrics = UplinkEncoder(self.uplink_cfg, None, None).encode(delta, size_of)
            decoded = enc.decode_dense(max_elements=1 << 26)
            for name, acc in self._sum.items():
                acc += float(weight[k]) * decoded[name].reshape(-1).astype(np.float64)
            uplinks.append(PreEncodedUplink(enc, metrics))
        self._total = int(samples.sum())
        for i in range(n):
            device_id = f"{prefix}-{i:05d}"
            signer = Signer(Ed25519PrivateKey.generate()) if signed else None
            builder = UpdateBuilder(device_id, self.federation, uplinks[i % distinct], signer)
            self.devices.append(SimDevice(i, device_id, self.urls[i % len(self.urls)], int(samples[i]), signer,
                                          builder, seq=seq0 + i))

    def public_keys(self) -> dict[str, str]:
        """device_id -> base64 public key (the coordinator's ``device_keys``)."""
        return {d.device_id: d.signer.public_key_b64 for d in self.devices if d.signer is not None}

    def expected_mean_delta(self, devices: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """The sample-weighted mean of the decoded differences (float64): FedAvg's step."""
        if devices is not None and set(devices) != {d.device_id for d in self.devices}:
            raise ValueError("the expected aggregate is kept for the whole fleet only")
        return {k: (acc / self._total).reshape(self.shapes[k]) for k, acc in self._sum.items()}

    def expected_global(self, server_lr: float = 1.0) -> dict[str, np.ndarray]:
        """The global after one FedAvg round of every device from the initial adapter."""
        mean = self.expected_mean_delta()
        return {k: (self.init[k].astype(np.float64) + server_lr * mean[k]).astype(np.float32) for k in self.init}

    # ------------------------------------------------------------------ the loop
    def start(self, timeout: float = 300.0) -> SimulatedFleet:
        """Connect every device (in batches, while the loop runs) and wait for all CONNACKs."""
        self._thread = threading.Thread(target=self._run, name="fleet-loop", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while self.connected_count() < self.n:
            if self.errors:
                raise RuntimeError(f"fleet failed: {self.errors[0]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {self.connected_count()} of {self.n} devices connected in {timeout:.0f}s")
            time.sleep(0.05)
        return self

    def connected_count(self) -> int:
        return sum(d.connected for d in self.devices)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _run(self) -> None:
        t_cpu = time.thread_time()
        try:
            to_connect = list(self.devices)
            last_misc = time.monotonic()
            while not self._stop.is_set():
                if to_connect and len(to_connect) + self.connected_count() <= self.n:
                    batch, to_connect = to_connect[:self.connect_batch], to_connect[self.connect_batch:]
                    for dev in batch:
                        self._connect(dev)
                timeout = 0.05
                if self._due:
                    timeout = max(0.0, min(timeout, self._due[0][0] - time.time()))
                for key, mask in self._sel.select(timeout):
                    client = key.data
                    if mask & selectors.EVENT_READ:
                        client.loop_read()
                    if mask & selectors.EVENT_WRITE:
                        client.loop_write()
                self._answer_due()
                self._refresh_statuses()
                now = time.monotonic()
                if now - last_misc >= 1.0:
                    last_misc = now
                    for dev in self.devices:
                        if dev.client is not None:
                            dev.client.loop_misc()
        except Exception as exc:  # noqa: BLE001 - reported to the caller, which fails on it
            import traceback

            self.errors.append(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        finally:
            for dev in self.devices:
                if dev.client is not None:
                    try:
                        dev.client.disconnect()
                        dev.client.loop_write()
                    except Exception:  # noqa: BLE001 - teardown
                        pass
            self.loop_cpu_s = time.thread_time() - t_cpu

    def _connect(self, dev: SimDevice) -> None:
        will = m.DeviceStatus(device_id=dev.device_id, online=False, seq=dev.seq, conn=1, will=True, state="offline")
        cfg = BrokerConfig(url=dev.url, keepalive_s=self.keepalive_s)
        client = new_paho_client(cfg, f"{dev.device_id}-{dev.seq}",
                                 will=WillMessage(self.topics.device_status(dev.device_id),
                                                  self._signed(dev, will).to_json(), QOS_STATUS, True),
                                 clean_start=True)
        client.user_data_set(dev)
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        client.on_connect = self._on_connect
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        dev.client = client
        client.connect(cfg.host, cfg.port, cfg.keepalive_s, clean_start=True)

    # paho callbacks (all on the loop thread)
    def _on_socket_open(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        self._sel.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(sock)

    def _on_register_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        self._sel.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client: mqtt.Client, dev: SimDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self._sel.modify(sock, selectors.EVENT_READ, client)

    def _on_connect(self, client: mqtt.Client, dev: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.errors.append(f"{dev.device_id}: connect refused ({reason})")
            return
        task_topic = self.topics.device_task(dev.device_id)
        client.subscribe([(task_topic, QOS_TASK), (task_topic + "/c/+", QOS_TASK)])
        self._publish_status(dev)
        dev.connected = True

    def _publish_status(self, dev: SimDevice) -> None:
        """The retained birth, and its refresh every ``status_interval_s`` (as an agent's)."""
        dev.counter += 1
        dev.status_at = time.monotonic()
        status = m.DeviceStatus(device_id=dev.device_id, online=True, seq=dev.seq, conn=1, counter=dev.counter,
                                method="lora", num_samples=dev.num_samples, eval_samples=0, state="idle")
        dev.client.publish(self.topics.device_status(dev.device_id), self._signed(dev, status).to_json(),
                           qos=QOS_STATUS, retain=True)

    def _refresh_statuses(self) -> None:
        now = time.monotonic()
        for _ in range(self.n):  # devices come due in the order they connected
            dev = self.devices[self._refresh_next]
            if not dev.connected or now - dev.status_at < self.status_interval_s:
                return
            self._publish_status(dev)
            self._refresh_next = (self._refresh_next + 1) % self.n

    def _on_disconnect(self, client: mqtt.Client, dev: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        """A simulated device does not reconnect (the external loop has no automatic reconnect):
        losing a connection before the fleet is closed fails the run."""
        dev.connected = False
        if not self._stop.is_set():
            self.errors.append(f"{dev.device_id}: disconnected ({reason})")

    def _signed(self, dev: SimDevice, st: m.DeviceStatus) -> m.DeviceStatus:
        if dev.signer is None:
            return st
        obj = st.model_dump(by_alias=True, mode="json", exclude_none=True)
        return st.model_copy(update={"signature": dev.signer.sign_status(self.federation, obj)})

    def _on_message(self, client: mqtt.Client, dev: SimDevice, msg: mqtt.MQTTMessage) -> None:
        try:
            done = self._reassembler.feed(msg.topic, msg.payload)
            if done is None:
                return
            task = m.Task.from_msgpack(body_of(done[1]))
        except ProtocolError as exc:
            self.errors.append(f"{dev.device_id}: bad task on {msg.topic}: {exc}")
            return
        if task.task_id in dev.answered or task.device_id != dev.device_id:
            return
        dev.tasks.append(task.task_id)
        now = time.time()
        delay = 0.0
        if task.kind == "fit":
            dev.task_at = now
            delay = self.answer_delay(dev.index) if self.answer_delay else 0.0
        self._order += 1
        heapq.heappush(self._due, (now + delay, self._order, dev.index, task))

    def _on_publish(self, client: mqtt.Client, dev: SimDevice, mid: int, reason: Any, props: Any) -> None:
        if mid in dev.pending_mids:
            dev.pending_mids.discard(mid)
            if not dev.pending_mids:
                dev.acked_at = time.time()

    def _answer_due(self) -> None:
        now = time.time()
        while self._due and self._due[0][0] <= now:
            _, _, index, task = heapq.heappop(self._due)
            self._answer(self.devices[index], task)

    def _answer(self, dev: SimDevice, task: m.Task) -> None:
        if task.task_id in dev.answered:
            return
        dev.answered.add(task.task_id)
        if task.kind == "init":  # the shared initial adapter, exactly
            payload = dev.builder.build(task, -1, dev.num_samples, {}, self.init)
        elif task.kind == "fit":
            payload = dev.builder.build(task, task.global_version, dev.num_samples,
                                        {"train_loss": 1.0, "steps": 1.0}, {"delta": np.zeros(0)})
            self.update_bytes.append(len(payload))
        else:
            payload = dev.builder.build(task, task.global_version, 1, {"eval_loss": 1.0}, None)
        topic = self.topics.device_update(dev.device_id)
        if task.kind == "fit":
            dev.sent_at, dev.acked_at = time.time(), None
        for suffix, frame in frame_payload(payload, self.chunk_size):
            info = dev.client.publish(topic + suffix, frame, qos=QOS_UPDATE)
            if task.kind == "fit":
                dev.pending_mids.add(info.mid)

    # ------------------------------------------------------------------ results
    def fit_times(self) -> FleetTimes:
        """Times of the last fit fan-out over the devices whose update the broker acknowledged."""
        done = [d for d in self.devices if d.acked_at is not None and d.task_at is not None and d.sent_at]
        if not done:
            raise RuntimeError("no device's fit update was acknowledged")
        task = [d.task_at for d in done if d.task_at is not None]
        sent = [d.sent_at for d in done if d.sent_at is not None]
        acked = [d.acked_at for d in done if d.acked_at is not None]
        return FleetTimes(len(done), min(task), max(task), min(sent), max(sent), min(acked), max(acked))


def max_abs_diff(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> float:
    """Largest absolute difference between two tensor maps of the same names and shapes."""
    if set(a) != set(b):
        raise ValueError(f"tensor names differ: {sorted(set(a) ^ set(b))[:4]}")
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in a)
