"""Streaming aggregation of adapter rounds: each accepted update is folded into a float64 running
sum as it arrives, so the coordinator holds O(model) + O(devices) whatever the number of updates;
the result equals the batch FedAvg of the same updates in any arrival order; robust rules, which are
not linear, still get every decoded update; a coordinator restarted mid-round refolds the
journalled updates and produces the same global."""

from __future__ import annotations

import random
import time
import tracemalloc

import numpy as np
import pytest

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.coordinator import Coordinator
from broker_coordinator.counters import CoordinatorCounters
from broker_coordinator.intake import Collection, UpdateIntake
from broker_coordinator.modes.adapter import AdapterMode
from broker_coordinator.state import FileStateStore
from broker_coordinator.strategy import RunningMean
from fedmq_protocol import messages as m
from fedmq_protocol.codec import CodecSpec, encode
from fedmq_protocol.topics import Topics

SHAPES = {"l0.lora_A.weight": (8, 96), "l0.lora_B.weight": (96, 8), "l1.lora_A.weight": (4, 33)}
TOPICS = Topics("fedmq", "test")
TASK = "r1-fit-v0-a0"
MAX_BYTES = 1 << 26


def _initial(seed: int = 0, shapes=SHAPES) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}


def _mode(cfg: CoordinatorConfig, shapes=SHAPES) -> AdapterMode:
    mode = AdapterMode(cfg)
    mode.adopt_initial(_initial(0, shapes))
    return mode


def _payload(i: int, seed: int, shapes=SHAPES, task: str = TASK) -> bytes:
    """Device ``d{i}``'s fit update: a random difference (every third one top-50 % sparse, every
    fourth int8), a sample count that differs per device."""
    rng = np.random.default_rng([seed, i])
    delta = {k: (0.05 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    spec = CodecSpec(density=0.5 if i % 3 == 0 else 1.0, values="int8" if i % 4 == 1 else "float32")
    return m.Update(kind="fit", task_id=task, round=1, device_id=f"d{i}", base_version=0,
                    num_samples=5 + 3 * i, tensors=encode(delta, spec)).to_msgpack()


def _collect(mode: AdapterMode, payloads: list[tuple[str, bytes]], c: Collection | None = None) -> Collection:
    if c is None:
        c = Collection("fit", TASK, 1, 0, {d for d, _ in payloads})
    intake = UpdateIntake(TOPICS, mode, CoordinatorCounters(), max_message_bytes=MAX_BYTES)
    for device_id, payload in payloads:
        assert intake.receive(TOPICS.device_update(device_id), payload, time.time(), c) is not None
    return c


def _aggregate(mode: AdapterMode, c: Collection) -> dict[str, np.ndarray]:
    devices = sorted(c.accepted)
    mode.aggregate_folded(1, 1, [c.accepted[d] for d in devices], [c.contributions.get(d) for d in devices],
                          c.running)
    assert mode.server is not None
    return {k: v.copy() for k, v in mode.server.exact.items()}


def _batch(cfg: CoordinatorConfig, payloads: list[tuple[str, bytes]]) -> dict[str, np.ndarray]:
    """The batch computation: every decoded update of the round at once (``AdapterMode.aggregate``)."""
    mode = _mode(cfg)
    updates = [m.Update.from_msgpack(p, max_bytes=MAX_BYTES) for _, p in sorted(payloads)]
    mode.aggregate(1, 1, updates, [mode.validate_update(u) for u in updates])
    assert mode.server is not None
    return mode.server.exact


def _assert_close(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-7, err_msg=k)


CONFIGS = {
    "fedavg": {},
    "fedavg-clip_norm": {"aggregation": {"rule": "fedavg", "clip_norm": 0.5}},
    "fedavgm": {"server_optimizer": {"name": "fedavgm", "lr": 1.0, "momentum": 0.9}},
    "fedadam-clip_norm": {"server_optimizer": {"name": "fedadam", "lr": 0.01},
                          "aggregation": {"rule": "fedavg", "clip_norm": 0.5}},
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_streamed_fedavg_equals_batch_fedavg_in_any_arrival_order(tmp_path, name):
    cfg = CoordinatorConfig.model_validate({"federation": "test", "state_dir": str(tmp_path), **CONFIGS[name]})
    payloads = [(f"d{i}", _payload(i, seed=1)) for i in range(7)]
    expected = _batch(cfg, payloads)
    shuffled = list(payloads)
    random.Random(3).shuffle(shuffled)
    for order in (payloads, payloads[::-1], shuffled):
        mode = _mode(cfg)
        c = _collect(mode, order)
        # folded as accepted: the round holds a running sum, no decoded or encoded tensors
        assert isinstance(c.running, RunningMean) and c.running.count == 7
        assert c.contributions == {}
        assert all(u.tensors.empty and u.num_samples > 0 for u in c.accepted.values())
        _assert_close(_aggregate(mode, c), expected)


@pytest.mark.parametrize("aggregation", [{"rule": "trimmed_mean", "trim_fraction": 0.2}, {"rule": "median"},
                                         {"rule": "fedavg", "clip_median_factor": 1.0}])
def test_robust_rules_keep_every_decoded_update_and_aggregate_as_in_batch(tmp_path, aggregation):
    cfg = CoordinatorConfig.model_validate({"federation": "test", "state_dir": str(tmp_path),
                                            "aggregation": aggregation})
    payloads = [(f"d{i}", _payload(i, seed=2)) for i in range(6)]
    mode = _mode(cfg)
    c = _collect(mode, payloads[::-1])
    assert c.running is None  # not linear: nothing folded
    assert sorted(c.contributions) == sorted(d for d, _ in payloads)
    assert all(set(c.contributions[d]) == set(SHAPES) for d in c.contributions)
    assert all(not u.tensors.empty for u in c.accepted.values())
    _assert_close(_aggregate(mode, c), _batch(cfg, payloads))


def test_updates_carried_into_a_retry_attempt_keep_folding_into_the_same_sum(tmp_path):
    cfg = CoordinatorConfig(federation="test", state_dir=tmp_path)
    payloads = [(f"d{i}", _payload(i, seed=4)) for i in range(5)]
    mode = _mode(cfg)
    first = _collect(mode, payloads[:2])  # attempt 0 missed its quorum
    retry = Collection("fit", "r1-fit-v0-a1", 1, 0, {d for d, _ in payloads[2:]}, attempt=1)
    retry.carry_over(first)
    again = [(d, _payload(int(d[1:]), seed=4, task=retry.task_id)) for d, _ in payloads[2:]]
    _collect(mode, again, retry)
    assert isinstance(retry.running, RunningMean) and retry.running.count == 5
    _assert_close(_aggregate(mode, retry), _batch(cfg, payloads))


def _held_bytes(rule: str, n: int) -> tuple[int, int]:
    """(bytes held by the round after folding ``n`` updates of ~1 MB decoded, peak while doing it),
    each update encoded just before it arrives and dropped after (as the network thread does)."""
    shapes = {"a.lora_A.weight": (16, 4096), "a.lora_B.weight": (4096, 16), "b.lora_A.weight": (16, 4096),
              "b.lora_B.weight": (4096, 16)}
    cfg = CoordinatorConfig.model_validate({"federation": "test", "aggregation": {"rule": rule}})
    mode = _mode(cfg, shapes)
    intake = UpdateIntake(TOPICS, mode, CoordinatorCounters(), max_message_bytes=MAX_BYTES)
    c = Collection("fit", TASK, 1, 0, {f"d{i}" for i in range(n)})
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(n):
            payload = _payload(i, seed=5, shapes=shapes)
            intake.receive(TOPICS.device_update(f"d{i}"), payload, time.time(), c)
            del payload
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(c.accepted) == n
    return held - base, peak - base


def test_round_memory_does_not_grow_with_the_number_of_updates_under_fedavg():
    held5, peak5 = _held_bytes("fedavg", 5)
    held50, peak50 = _held_bytes("fedavg", 50)
    print(f"fedavg: held {held5 / 1e6:.2f} MB / {held50 / 1e6:.2f} MB, peak {peak5 / 1e6:.2f} MB / "
          f"{peak50 / 1e6:.2f} MB with 5 / 50 updates of 1.05 MB (float32) each")
    assert held50 <= 1.1 * held5 and peak50 <= 1.1 * peak5
    # the measurement sees the difference: the median keeps every decoded update
    med5, _ = _held_bytes("median", 5)
    med50, _ = _held_bytes("median", 50)
    print(f"median: held {med5 / 1e6:.2f} MB / {med50 / 1e6:.2f} MB with 5 / 50 updates")
    assert med50 > 8 * med5 and med50 > 40 * 1_000_000


def _restarted_coordinator(cfg: CoordinatorConfig) -> Coordinator:
    coord = Coordinator(cfg, store=FileStateStore(cfg.state_dir))
    coord.rounds.wait_for_devices = lambda n, timeout: None  # type: ignore[method-assign]
    return coord


def test_coordinator_restarted_mid_round_refolds_the_journal_and_produces_the_same_global(tmp_path):
    cfg = CoordinatorConfig.model_validate({"federation": "test", "state_dir": str(tmp_path / "c"),
                                            "min_clients": 1, "server_optimizer": {"name": "fedadam", "lr": 0.01}})
    payloads = [(f"d{i}", _payload(i, seed=6)) for i in range(6)]
    first = Coordinator(cfg, store=FileStateStore(cfg.state_dir))
    first.state.global_model = first.mode.adopt_initial(_initial(0))
    first.state.mode_state = first.mode.state_blob()
    first.store.save(first.state)
    c = Collection("fit", TASK, 1, 0, {d for d, _ in payloads})
    first.rounds.open = c
    first.store.save_open_round(c.journal())
    arrival = [payloads[i] for i in (4, 1, 5)]  # accepted and journalled, then the process dies
    for device_id, payload in arrival:
        first.rounds.on_update(TOPICS.device_update(device_id), payload, time.time())
    assert first.counters.fit_accepted == 3 and isinstance(c.running, RunningMean)
    del first, c

    second = _restarted_coordinator(cfg)
    resumed = second.rounds._resume_open_round(1)
    assert resumed is not None and sorted(resumed.accepted) == ["d1", "d4", "d5"]
    assert second.counters.restored == 3
    assert isinstance(resumed.running, RunningMean) and resumed.running.count == 3
    rest = [payloads[i] for i in (0, 3, 2)]
    for device_id, payload in rest:
        second.rounds.on_update(TOPICS.device_update(device_id), payload, time.time())
    assert resumed.running.count == 6 and resumed.contributions == {}
    assert isinstance(second.mode, AdapterMode)
    restarted = _aggregate(second.mode, resumed)

    uninterrupted = _mode(cfg)
    _assert_close(restarted, _aggregate(uninterrupted, _collect(uninterrupted, arrival + rest)))
    _assert_close(restarted, _batch(cfg, payloads))
