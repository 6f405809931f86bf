"""The split server on a real Mosquitto: split steps, duplicates, late and bad requests, restarts."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_agent.split_link import SplitLink, SplitStepFailed
from fedmq_protocol import messages as m
from fedmq_protocol.codec import CodecSpec
from fedmq_protocol.modes.split import (
    SplitRequest,
    SplitResponse,
    SplitTask,
    encode_hidden,
    pack_mask,
    request_topic,
    response_topic,
)
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport
from fedmq_protocol.transport.config import BrokerConfig
from split_server.config import SplitServerConfig
from split_server.server import SplitServer
from tests.split_support import build_deep_tiny_llama

TOPICS = Topics("fedmq", "test")
CUT = {"l_head": 1, "l_tail": 1, "activations": "float32", "gradients": "float32", "zstd": False,
       "step_timeout_s": 5.0, "step_retries": 1}
H = 64


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> str:
    return build_deep_tiny_llama(tmp_path_factory.mktemp("deep-llama"), layers=4)


class Harness:
    """A split server running in a thread, a test client that plays coordinator (tasks) and
    devices (raw requests), and every answer it receives."""

    def __init__(self, url: str, model: str, state_dir) -> None:
        self.url, self.model, self.state_dir = url, model, state_dir
        self.answers: list[SplitResponse] = []
        self.raw: list[bytes] = []
        self.lock = threading.Lock()
        self.client = MqttTransport(BrokerConfig(url=url), f"test-{time.time_ns()}", clean_start=True)
        self.client.subscribe(f"{TOPICS.base}/split/+/response", self._on_answer, qos=1, framed=True)
        self.client.connect(10)
        self.server: SplitServer | None = None

    def _on_answer(self, topic, payload):
        with self.lock:
            self.raw.append(payload)
            self.answers.append(SplitResponse.from_msgpack(payload))

    def start_server(self, **extra) -> SplitServer:
        cfg = SplitServerConfig(federation="test", broker={"url": self.url}, model=self.model,
                                adapter={"r": 4, "alpha": 8}, split=CUT, state_dir=self.state_dir,
                                status_interval_s=0.5, **extra)
        self.server = server = SplitServer(cfg)
        server.load()
        server.start()
        self.thread = threading.Thread(target=server.run, daemon=True)
        self.thread.start()
        return server

    def stop_server(self) -> None:
        assert self.server is not None
        self.server.stop_event.set()
        self.thread.join(20)

    def task(self, device: str, task_id: str, kind: str = "fit", **cut) -> None:
        t = m.Task(kind=kind, task_id=task_id, round=1, device_id=device, global_version=0, deadline_s=300,
                   adapter=m.AdapterSpec(r=4, alpha=8), fit=m.FitConfig(lr=1e-2),
                   payload=SplitTask(**{**CUT, **cut}))
        self.client.publish(TOPICS.device_task(device), t.to_msgpack(), qos=1, framed=True)

    def request(self, device: str, task_id: str, step: int, phase: str, array: np.ndarray,
                mask: np.ndarray | None = None, *, attempt: int = 0) -> SplitResponse:
        fields = {}
        if mask is not None:
            shape, bits = pack_mask(mask)
            fields = {"mask_shape": shape, "mask": bits}
        req = SplitRequest(device_id=device, task_id=task_id, step=step, phase=phase, correlation=b"c%d" % step,
                           tensors=encode_hidden(array, CodecSpec(auto_sparse=False)), attempt=attempt,
                           response_topic=response_topic(TOPICS.base, device), **fields)
        n = len(self.answers)
        self.client.publish(request_topic(TOPICS.base, device), req.to_msgpack(), qos=1, framed=True)
        deadline = time.monotonic() + 20
        while len(self.answers) <= n:
            assert time.monotonic() < deadline, "no answer from the split server"
            time.sleep(0.01)
        return self.answers[n]

    def wait_task(self, device: str) -> None:
        deadline = time.monotonic() + 10
        while self.server is None or device not in self.server.tasks:
            assert time.monotonic() < deadline, "the split server never saw the task"
            time.sleep(0.01)

    def close(self) -> None:
        if self.server is not None and not self.server.stop_event.is_set():
            self.stop_server()
        self.client.close()


def _batch(rng, b=2, t=6):
    h = rng.standard_normal((b, t, H)).astype(np.float32)
    mask = np.ones((b, t), dtype=np.int64)
    mask[1, 4:] = 0
    return h, mask


def test_duplicate_late_and_bad_requests_are_harmless(mqtt_broker, deep_llama, tmp_path):
    hx = Harness(mqtt_broker.url, deep_llama, tmp_path / "server")
    rng = np.random.default_rng(0)
    try:
        server = hx.start_server()
        hx.task("dev-0", "r1-fit")
        hx.wait_task("dev-0")
        h, mask = _batch(rng)
        fwd = hx.request("dev-0", "r1-fit", 0, "forward", h, mask)
        assert fwd.ok and fwd.tensors is not None
        out = fwd.tensors.decode_dense(max_elements=1 << 20)["h"]
        assert out.shape == h.shape and np.isfinite(out).all()
        # a QoS-1 duplicate of the forward: the same bytes again, nothing recomputed or kept twice
        assert hx.request("dev-0", "r1-fit", 0, "forward", h, mask, attempt=1) == fwd
        before = server.adapter_state()
        g = rng.standard_normal(h.shape).astype(np.float32)
        bwd = hx.request("dev-0", "r1-fit", 0, "backward", g)
        assert bwd.ok and bwd.server_step == 1
        after = server.adapter_state()
        assert any(not np.array_equal(before[k], after[k]) for k in before)  # the server adapter stepped
        # the backward again (duplicate or retry): its first answer's bytes, the adapter not stepped twice
        n_raw = len(hx.raw)
        assert hx.request("dev-0", "r1-fit", 0, "backward", g, attempt=1) == bwd
        assert hx.raw[n_raw] == hx.raw[n_raw - 1]
        assert server.server_step == 1 and all(np.array_equal(after[k], server.adapter_state()[k]) for k in after)
        # step 1 forward, then a late forward of step 0 (already applied): refused, counted
        assert hx.request("dev-0", "r1-fit", 1, "forward", h, mask).ok
        late = hx.request("dev-0", "r1-fit", 0, "forward", h + 1, mask, attempt=2)
        assert not late.ok and "already applied" in late.reason
        # bad input: wrong hidden size, non-finite values, a backward of the wrong shape
        bad = hx.request("dev-0", "r1-fit", 2, "forward", rng.standard_normal((2, 6, H + 1)).astype(np.float32), mask)
        assert not bad.ok and "shape" in bad.reason
        nan = h.copy()
        nan[0, 0, 0] = np.nan
        assert "non-finite" in hx.request("dev-0", "r1-fit", 3, "forward", nan, mask).reason
        assert hx.request("dev-0", "r1-fit", 4, "forward", h, mask).ok
        wrong = hx.request("dev-0", "r1-fit", 4, "backward", g[:, :3])
        assert not wrong.ok and "shape" in wrong.reason
        # a backward with no forward state: refused, the device is told to send the forward again
        unknown = hx.request("dev-0", "r1-fit", 9, "backward", g)
        assert not unknown.ok and unknown.redo_forward
        # a device not in the round, a task id that is not the device's open task, another cut
        assert "no open task" in hx.request("dev-7", "r1-fit", 0, "forward", h, mask).reason
        assert "no open task" in hx.request("dev-0", "r0-fit", 0, "forward", h, mask).reason
        hx.task("dev-1", "r1-fit-b", l_head=2)
        hx.wait_task("dev-1")
        assert "cuts at" in hx.request("dev-1", "r1-fit-b", 0, "forward", h, mask).reason
        # undecodable bytes on a request topic: counted, no answer, the server keeps serving
        hx.client.publish(request_topic(TOPICS.base, "dev-0"), b"\xc1garbage", qos=1, framed=True)
        assert hx.request("dev-0", "r1-fit", 4, "backward", g).ok
        assert server.server_step == 2 and server.counters["applied"] == 2
        refused = server.refused
        assert refused["late_step"] == 1 and refused["non_finite"] == 1 and refused["bad_tensor"] == 2
        assert refused["unknown_step"] == 1 and refused["not_in_round"] == 2 and refused["cut_mismatch"] == 1
        assert refused["bad_message"] == 1 and server.counters["duplicates"] == 2
        assert hx.thread.is_alive()
    finally:
        hx.close()


def test_restart_mid_round_resumes_and_a_link_redoes_a_lost_forward(mqtt_broker, deep_llama, tmp_path):
    """Two steps applied, the server stops; a new server process state from the same state dir has
    the same adapter and step count, answers a repeat of the last backward from its persisted
    answer without applying it, and a device whose forward was lost sends it again."""
    hx = Harness(mqtt_broker.url, deep_llama, tmp_path / "server")
    rng = np.random.default_rng(1)
    try:
        server = hx.start_server()
        hx.task("dev-0", "r1-fit")
        hx.wait_task("dev-0")
        h, mask = _batch(rng)
        g = rng.standard_normal(h.shape).astype(np.float32)
        for step in range(2):
            assert hx.request("dev-0", "r1-fit", step, "forward", h, mask).ok
            last = hx.request("dev-0", "r1-fit", step, "backward", g)
            assert last.ok
        assert hx.request("dev-0", "r1-fit", 2, "forward", h, mask).ok  # pending when the server stops
        state = server.adapter_state()
        hx.stop_server()

        server = hx.start_server()  # the open task is known from the state file: no new task message
        assert server.server_step == 2 and "dev-0" in server.tasks
        assert all(np.array_equal(state[k], v) for k, v in server.adapter_state().items())
        again = hx.request("dev-0", "r1-fit", 1, "backward", g, attempt=1)
        assert again == last and server.server_step == 2
        # the device side: SplitLink sees the lost forward (redo_forward) and sends it again
        from edge_agent.config import AgentConfig

        (tmp_path / "none.jsonl").write_text("")
        cfg = AgentConfig(device_id="dev-0", federation="test", broker={"url": mqtt_broker.url}, model="tiny-llama",
                          method="split", data={"train": str(tmp_path / "none.jsonl")}, state_dir=str(tmp_path / "a"))
        link = SplitLink(cfg, TOPICS)
        link.begin("r1-fit", SplitTask(**CUT))
        redone = []
        g_head = link.backward(2, g, redo=lambda: redone.append(link.forward(2, h, mask)))
        assert redone and g_head.shape == h.shape and server.server_step == 3
        assert link.stats.requests == 3 and link.stats.bytes_up > 0 and link.stats.bytes_down > 0
        link.close()
        # no server answers at all: the link retries, then gives up with a clear error
        hx.stop_server()
        link = SplitLink(cfg, TOPICS)
        link.begin("r1-fit", SplitTask(**{**CUT, "step_timeout_s": 0.3, "step_retries": 1}))
        with pytest.raises(SplitStepFailed, match="no answer after 2 requests"):
            link.forward(3, h, mask)
        assert link.stats.retries == 2
        link.close()
    finally:
        hx.close()


def test_example_configs_of_a_split_federation_validate():
    from broker_coordinator.config import CoordinatorConfig
    from edge_agent.config import AgentConfig
    from fedmq.configfile import ConfigError, load_config
    from tests.federation import REPO

    server = load_config(REPO / "configs/split-server.yaml", SplitServerConfig)
    coord = load_config(REPO / "configs/coordinator-split.yaml", CoordinatorConfig)
    assert coord.mode == "split" and (coord.split.l_head, coord.split.l_tail) == (server.split.l_head,
                                                                                   server.split.l_tail)
    assert coord.adapter == server.adapter
    import yaml

    raw = yaml.safe_load((REPO / "configs/agent-split.yaml").read_text())
    raw["data"] = {"train": str(REPO / "configs/agent-split.yaml")}  # any existing file
    assert AgentConfig.model_validate(raw).mode == "split"
    bad = REPO / "configs/split-server.yaml"
    with pytest.raises(ConfigError, match=r"split\.l_head"):
        load_config(bad, SplitServerConfig, {"split": {"l_head": 0}})


def test_service_install_writes_a_split_server_unit(tmp_path):
    from fedmq.service import install

    cfg = tmp_path / "split-server.yaml"
    cfg.write_text("model: smollm2-135m\nsplit: {l_head: 2, l_tail: 2}\n")
    res = install("split-server", cfg, root=tmp_path / "root", exec_start="/usr/local/bin/fedmq")
    assert "ExecStart=/usr/local/bin/fedmq split-server --config /etc/fedmq/split-server.yaml" in res.unit
    assert "CacheDirectory=fedmq" in res.unit and res.config["state_dir"] == "/var/lib/fedmq-split-server"


def test_interleaved_steps_of_two_devices_get_the_gradients_of_the_weights_their_forward_saw(deep_llama, tmp_path):
    """A forward, B forward, A backward (the shared adapter steps), B backward: B's head-cut
    gradient is exactly the one of the adapter B's forward ran on (no recompute, no error from
    the in-place step), and B's step is applied on top of A's."""
    import copy

    import torch

    cfg = SplitServerConfig(federation="test", model=deep_llama, adapter={"r": 4, "alpha": 8}, split=CUT,
                            state_dir=tmp_path / "s")
    server = SplitServer(cfg)  # no broker: requests handed in directly, answers returned
    server.load()
    with torch.no_grad():  # lora_B off zero, so the adapter shapes the gradients
        for n, p in server.params.items():
            if ".lora_B." in n:
                p.normal_(0, 0.05)
    reference = copy.deepcopy(server.part)  # the adapter both forwards see
    for dev in ("dev-a", "dev-b"):
        t = m.Task(kind="fit", task_id=f"t-{dev}", round=1, device_id=dev, global_version=0, deadline_s=300,
                   adapter=m.AdapterSpec(r=4, alpha=8), fit=m.FitConfig(lr=1e-2), payload=SplitTask(**CUT))
        server.on_task(TOPICS.device_task(dev), t.to_msgpack())
    rng = np.random.default_rng(3)
    h = {d: rng.standard_normal((2, 5, H)).astype(np.float32) for d in ("dev-a", "dev-b")}
    g = {d: rng.standard_normal((2, 5, H)).astype(np.float32) for d in ("dev-a", "dev-b")}
    mask = np.ones((2, 5), dtype=np.int64)

    def ask(dev, phase, arr):
        fields = {}
        if phase == "forward":
            shape, bits = pack_mask(mask)
            fields = {"mask_shape": shape, "mask": bits}
        req = SplitRequest(device_id=dev, task_id=f"t-{dev}", step=0, phase=phase, correlation=b"x",
                           tensors=encode_hidden(arr, CodecSpec(auto_sparse=False)),
                           response_topic=response_topic(TOPICS.base, dev), **fields)
        resp = SplitResponse.from_msgpack(server.on_request(request_topic(TOPICS.base, dev), req.to_msgpack()))
        assert resp.ok, resp.reason
        return resp.tensors.decode_dense(max_elements=1 << 20)["h"]

    ask("dev-a", "forward", h["dev-a"])
    ask("dev-b", "forward", h["dev-b"])
    ask("dev-a", "backward", g["dev-a"])
    assert server.server_step == 1
    got = ask("dev-b", "backward", g["dev-b"])
    x = torch.from_numpy(h["dev-b"]).requires_grad_(True)
    reference.forward(x, torch.from_numpy(mask)).backward(torch.from_numpy(g["dev-b"]))
    np.testing.assert_allclose(got, x.grad.numpy(), rtol=1e-5, atol=1e-6)
    assert server.server_step == 2 and server.counters["applied"] == 2


def test_demo_with_method_split_configures_a_split_server_the_coordinator_and_agents_agree_with(tmp_path):
    from broker_coordinator.config import CoordinatorConfig
    from edge_agent.config import AgentConfig
    from fedmq.configfile import load_config
    from fedmq.demo import DemoOptions, write_configs, write_split_server_config

    data = tmp_path / "data"
    data.mkdir()
    for name in ("device_0.jsonl", "device_1.jsonl", "eval.jsonl"):
        (data / name).write_text('{"prompt": "a", "response": "b"}\n')
    opts = DemoOptions(method="split", agents=2, workdir=tmp_path / "demo", broker="mqtt://127.0.0.1:1883")
    (tmp_path / "demo").mkdir()
    coord_path, agent_paths = write_configs(opts, "mqtt://127.0.0.1:1883", "/models/smollm2", data)
    server = load_config(write_split_server_config(opts, "mqtt://127.0.0.1:1883", "/models/smollm2"),
                         SplitServerConfig)
    coord = load_config(coord_path, CoordinatorConfig)
    agents = [load_config(p, AgentConfig) for p in agent_paths]
    assert coord.mode == "split" and coord.split == server.split and coord.adapter == server.adapter
    assert server.federation == coord.federation == agents[0].federation
    assert all(a.mode == "split" and a.method == "split" for a in agents)


def test_on_mqtt5_requests_and_answers_carry_response_topic_and_correlation_properties(mqtt_broker, deep_llama,
                                                                                         tmp_path):
    import paho.mqtt.client as mqtt

    from edge_agent.config import AgentConfig
    from edge_agent.split_link import correlation_of

    seen: list[tuple[str, object, object]] = []
    sniffer = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="sniffer", protocol=mqtt.MQTTv5)
    sniffer.on_message = lambda c, u, msg: seen.append(
        (msg.topic, getattr(msg.properties, "ResponseTopic", None), getattr(msg.properties, "CorrelationData", None)))
    sniffer.connect(mqtt_broker.host, mqtt_broker.port)
    sniffer.subscribe(f"{TOPICS.base}/split/#", qos=1)
    sniffer.loop_start()
    hx = Harness(mqtt_broker.url, deep_llama, tmp_path / "server")
    try:
        hx.start_server()
        hx.task("dev-0", "r1-fit")
        hx.wait_task("dev-0")
        (tmp_path / "none.jsonl").write_text("")
        cfg = AgentConfig(device_id="dev-0", federation="test", broker={"url": mqtt_broker.url}, model="tiny-llama",
                          method="split", data={"train": str(tmp_path / "none.jsonl")}, state_dir=str(tmp_path / "a"))
        link = SplitLink(cfg, TOPICS)
        link.begin("r1-fit", SplitTask(**CUT))
        h, mask = _batch(np.random.default_rng(2))
        assert link.forward(0, h, mask).shape == h.shape
        link.close()
        time.sleep(0.3)
    finally:
        hx.close()
        sniffer.loop_stop()
        sniffer.disconnect()
    corr = correlation_of("dev-0", ("r1-fit", 0, "forward"))
    req = [s for s in seen if s[0] == request_topic(TOPICS.base, "dev-0")]
    ans = [s for s in seen if s[0] == response_topic(TOPICS.base, "dev-0")]
    assert req and all(r[1] == response_topic(TOPICS.base, "dev-0") and r[2] == corr for r in req)
    assert ans and all(a[2] == corr for a in ans)


def test_with_the_coordinator_key_only_tasks_it_signed_open_steps(mqtt_broker, deep_llama, tmp_path):
    """Tasks name who is in a round; with ``coordinator_public_key`` set, an unsealed task, one
    signed with another key and a replay of a signed one open no step."""
    from fedmq_protocol.seal import Sealer
    from fedmq_protocol.signing import Signer, generate_keypair

    pem, pub = generate_keypair()
    (tmp_path / "coordinator.pem").write_bytes(pem)
    other_pem, _ = generate_keypair()
    (tmp_path / "other.pem").write_bytes(other_pem)
    coordinator = Sealer("test", Signer.from_file(tmp_path / "coordinator.pem"))
    forger = Sealer("test", Signer.from_file(tmp_path / "other.pem"))

    def task_bytes(device: str, task_id: str) -> bytes:
        return m.Task(kind="fit", task_id=task_id, round=1, device_id=device, global_version=0, deadline_s=300,
                      adapter=m.AdapterSpec(r=4, alpha=8), fit=m.FitConfig(lr=1e-2),
                      payload=SplitTask(**CUT)).to_msgpack()

    hx = Harness(mqtt_broker.url, deep_llama, tmp_path / "server")
    rng = np.random.default_rng(2)
    try:
        server = hx.start_server(coordinator_public_key=pub)
        publish = hx.client.publish
        publish(TOPICS.device_task("dev-1"), task_bytes("dev-1", "r1-forged"), qos=1, framed=True)
        topic2 = TOPICS.device_task("dev-2")
        publish(topic2, forger.seal(topic2, task_bytes("dev-2", "r1-other-key"), round_no=1, version=0),
                qos=1, framed=True)
        topic0 = TOPICS.device_task("dev-0")
        real = coordinator.seal(topic0, task_bytes("dev-0", "r1-fit"), round_no=1, version=0)
        publish(topic0, real, qos=1, framed=True)
        hx.wait_task("dev-0")
        # an unchanged replay of the signed task, and a later signed one: only the later is taken
        publish(topic0, real, qos=1, framed=True)
        h, mask = _batch(rng)
        assert hx.request("dev-0", "r1-fit", 0, "forward", h, mask).ok
        assert set(server.tasks) == {"dev-0"}
        for device, task_id in (("dev-1", "r1-forged"), ("dev-2", "r1-other-key")):
            assert "no open task" in hx.request(device, task_id, 0, "forward", h, mask).reason
        assert server.seals.replays == 1
    finally:
        hx.close()
