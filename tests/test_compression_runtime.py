"""Error feedback on the device, snapshot/difference downlink, server optimizers."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.coordinator import Coordinator
from broker_coordinator.downlink import DownlinkConfig, ServerModel, ServerOptimizerConfig
from broker_coordinator.state import InMemoryStateStore
from edge_agent.uplink import UplinkConfig, UplinkEncoder
from fedmq_protocol import messages as m
from fedmq_protocol.codec import CodecSpec, encode
from fedmq_protocol.globals import GlobalSync
from fedmq_protocol.seal import body_of
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport
from fedmq_protocol.transport.config import BrokerConfig

ADAPTER = m.AdapterSpec(r=2, target_modules=("q_proj",))


def _weights(seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"l{i}.lora_{ab}.weight": (rng.standard_normal((16, 24)) * scale).astype(np.float32)
            for i in range(3) for ab in "AB"}


def _size(enc) -> int:
    return enc.nbytes()


def test_agent_restarted_between_rounds_keeps_its_error_feedback_residual(tmp_path):
    cfg = UplinkConfig(values="int8", density=0.05)
    before = UplinkEncoder(cfg, None, tmp_path)
    before.encode(_weights(1, 1e-3), _size)
    assert before.residual is not None and any(np.abs(r).sum() > 0 for r in before.residual.values())

    restarted = UplinkEncoder(cfg, None, tmp_path)  # a new agent process reads the state dir
    assert set(restarted.residual) == set(before.residual)
    for k in before.residual:
        np.testing.assert_array_equal(restarted.residual[k], before.residual[k])
    # the next round's update is the same as if the agent had never stopped
    enc_restarted, _ = restarted.encode(_weights(2, 1e-3), _size)
    enc_continued, _ = before.encode(_weights(2, 1e-3), _size)
    assert enc_restarted.to_wire() == enc_continued.to_wire()


def test_error_feedback_loses_nothing_only_delays_it(tmp_path):
    enc = UplinkEncoder(UplinkConfig(values="int8", density=0.02), None, tmp_path)
    total_delta = {k: np.zeros_like(v, dtype=np.float64) for k, v in _weights(0).items()}
    total_sent = {k: np.zeros_like(v, dtype=np.float64) for k, v in total_delta.items()}
    for r in range(5):
        delta = _weights(10 + r, 1e-2)
        e, metrics = enc.encode(delta, _size)
        sent = e.decode_dense(max_elements=10**6)
        for k in delta:
            total_delta[k] += delta[k]
            total_sent[k] += sent[k]
        assert metrics["uplink_density"] <= 0.03
    for k in total_delta:  # sent + still pending == everything the device produced
        np.testing.assert_allclose(total_sent[k] + enc.residual[k], total_delta[k], atol=1e-6)


def test_byte_budget_bounds_every_update_and_is_reported(tmp_path):
    enc = UplinkEncoder(UplinkConfig(), 2000, tmp_path)
    dense = encode(_weights(0)).nbytes()
    for r in range(3):
        e, metrics = enc.encode(_weights(r), _size)
        assert _size(e) <= 2000 < dense
        assert metrics["uplink_bytes"] == _size(e) and metrics["uplink_budget_bytes"] == 2000
        assert 0 < metrics["uplink_density"] < 1


def test_a_difference_is_never_applied_to_another_base():
    server = ServerModel(_weights(0), DownlinkConfig(snapshot_every=100), ServerOptimizerConfig())
    dev = GlobalSync(max_elements=10**6)
    dev.offer(server.snapshot(0, 0, ADAPTER, None))
    msgs = []
    for v in (1, 2, 3):
        server.step({k: np.full(a.shape, 0.01 * v) for k, a in server.exact.items()})
        msgs.append(server.advance(v, v, ADAPTER, None))
    assert not dev.offer(msgs[1])  # v2 needs v1: held back, v0 unchanged
    assert dev.version == 0 and dev.missing
    assert not dev.offer(msgs[2])
    assert dev.offer(msgs[0])  # v1 arrives: v1, v2, v3 apply in order
    assert dev.version == 3 and dev.diffs_applied == 3
    for k, a in server.published.items():
        np.testing.assert_array_equal(dev.arrays[k], a)


def test_device_that_misses_two_globals_converges_to_the_coordinators_exact_weights(mosquitto, tmp_path):
    """Lossy downlink (top-30 % int8 differences), a snapshot every 3 versions, over Mosquitto:
    a device offline for v2 and v3 reconnects and ends bitwise equal to the coordinator."""
    broker = mosquitto(message_size_limit=8192)
    bcfg = {"url": broker.url, "chunk_size": 4096}
    cfg = CoordinatorConfig(federation="test", broker=bcfg, state_dir=tmp_path / "c",
                            downlink=DownlinkConfig(snapshot_every=3, values="int8", density=0.3))
    coord = Coordinator(cfg, store=InMemoryStateStore())
    topics = Topics("fedmq", "test")

    class Device:
        def __init__(self, name: str) -> None:
            self.sync, self.lock, self.name = GlobalSync(10**7), threading.Lock(), name

        def connect(self) -> None:
            self.t = MqttTransport(BrokerConfig(**bcfg), f"{self.name}-{time.time_ns()}", clean_start=True)
            for f in (topics.global_model, topics.all_global_diffs):
                self.t.subscribe(f, self.on, qos=1, framed=True)
            self.t.connect(10)

        def on(self, topic: str, payload: bytes) -> None:
            if payload:
                with self.lock:
                    self.sync.offer(m.GlobalModel.from_msgpack(body_of(payload)))

        def wait(self, version: int) -> None:
            deadline = time.monotonic() + 20
            while self.sync.version != version:
                assert time.monotonic() < deadline, f"{self.name} stuck at v{self.sync.version}"
                time.sleep(0.05)

    always, flaky = Device("always"), Device("flaky")
    coord.transport.connect(10)
    try:
        server = coord.mode.server = ServerModel(_weights(0, 0.1), cfg.downlink, cfg.server_optimizer)
        coord.state.global_model = server.snapshot(0, 0, ADAPTER, None)
        coord.publisher.publish()
        always.connect()
        flaky.connect()
        rng = np.random.default_rng(5)
        for v in range(1, 7):
            if v == 2:
                flaky.t.close()  # misses v2 (a difference) and v3 (a snapshot)
            if v == 4:
                flaky.connect()  # retained: snapshot v3; then v4.. live
                flaky.wait(3)
            server.step({k: rng.standard_normal(a.shape) * 0.01 for k, a in server.exact.items()})
            msg = server.advance(v, v, ADAPTER, None)
            coord.state.global_model = server.snapshot(v, v, ADAPTER, None)
            coord.publisher.publish(msg)
            always.wait(v)
        flaky.wait(6)
        late = Device("late")  # joins now: retained snapshot v6
        late.connect()
        late.wait(6)
        for dev in (always, flaky, late):
            for k, a in server.published.items():
                np.testing.assert_array_equal(dev.sync.arrays[k], a, err_msg=f"{dev.name} {k}")
        # the lossy downlink's dropped part is tracked, not lost: devices are close to the optimizer's weights
        err = max(float(np.abs(server.exact[k] - server.published[k]).max()) for k in server.exact)
        assert err < 0.02
        # snapshots v0, v3, v6; the flaky device applied differences v1, v4, v5 only
        assert always.sync.diffs_applied == 4 and flaky.sync.snapshots_applied == 3 and flaky.sync.diffs_applied == 3
    finally:
        for dev in (always, flaky):
            dev.t.close()
        coord.transport.close()


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimizers_follow_their_rules_and_survive_a_restart(name):
    x0 = _weights(0)
    d = {k: np.full(a.shape, 0.01, np.float64) for k, a in x0.items()}
    opt = ServerOptimizerConfig(name=name, lr=1e-2 if name == "fedadam" else 1.0)
    sm = ServerModel(x0, DownlinkConfig(), opt)
    sm.step(d)
    resumed = ServerModel.from_blob(sm.to_blob(), sm.published, DownlinkConfig(), opt)
    sm.step(d)
    resumed.step(d)
    k = next(iter(x0))
    if name == "fedavgm":  # x0 + d + (0.9 d + d)
        np.testing.assert_allclose(sm.exact[k], x0[k] + 0.01 + 0.019, atol=1e-6)
    else:  # Adam on a constant pseudo-gradient moves every coordinate by ~lr per step
        np.testing.assert_allclose(sm.exact[k], x0[k] + 2e-2, atol=1e-4)
    np.testing.assert_array_equal(resumed.exact[k], sm.exact[k])


def test_coordinator_config_selects_server_optimizer_and_downlink():
    cfg = CoordinatorConfig.model_validate({"server_optimizer": {"name": "fedadam", "lr": 0.001},
                                            "downlink": {"snapshot_every": 5, "values": "int8", "density": 0.1,
                                            "zstd": False}})
    assert cfg.server_optimizer.name == "fedadam" and cfg.downlink.spec() == CodecSpec(values="int8", density=0.1)
    with pytest.raises(ValueError, match="snapshot_every"):
        CoordinatorConfig.model_validate({"downlink": {"snapshot_every": 0}})


def test_v0_snapshot_of_a_fresh_adapter_is_compressed_and_exact():
    """A fresh LoRA adapter (random lora_A, all-zero lora_B) goes out as exact float32 + zstd:
    lora_B costs almost nothing, and the device's weights are bitwise the coordinator's."""
    rng = np.random.default_rng(0)
    fresh = {}
    for i in range(4):  # SmolLM2-like q/v projections at r=8
        fresh[f"l{i}.lora_A.weight"] = (rng.standard_normal((8, 576)) * 0.04).astype(np.float32)
        fresh[f"l{i}.lora_B.weight"] = np.zeros((576, 8), np.float32)
    fresh["l0.lora_B.weight"][0, 0] = -0.0  # signed zeros survive too
    numel_a = sum(a.size for k, a in fresh.items() if "lora_A" in k)
    dense = 4 * sum(a.size for a in fresh.values())

    server = ServerModel(fresh, DownlinkConfig(), ServerOptimizerConfig())  # the defaults: zstd on
    snap = server.snapshot(0, 0, ADAPTER, None)
    size = len(snap.to_msgpack())
    plain = ServerModel(fresh, DownlinkConfig(values="float32", zstd=False), ServerOptimizerConfig())
    assert len(plain.snapshot(0, 0, ADAPTER, None).to_msgpack()) >= dense  # dense fp32: everything
    assert size < 4 * numel_a + 2048  # lora_B (half the adapter) is nearly free
    assert size < 0.55 * dense

    dev = GlobalSync(max_elements=10**6)
    assert dev.offer(m.GlobalModel.from_msgpack(snap.to_msgpack()))
    for k, a in server.published.items():
        assert dev.arrays[k].dtype == np.float32
        assert dev.arrays[k].tobytes() == a.tobytes(), k  # bitwise, -0.0 included
    # all-zero weights (e.g. a zero-initialised adapter) shrink to a small fraction of dense
    zeros = {k: np.zeros_like(a) for k, a in fresh.items()}
    zsnap = ServerModel(zeros, DownlinkConfig(), ServerOptimizerConfig()).snapshot(0, 0, ADAPTER, None)
    assert len(zsnap.to_msgpack()) < 0.02 * dense
