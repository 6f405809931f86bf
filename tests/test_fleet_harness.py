"""The fleet load harness (bench/fleet_harness.py) and the fleet benchmark's row (bench/fleet.py):
simulated devices are real MQTT connections driven by one thread, announce themselves with signed
statuses, and answer the real coordinator with int2 updates of SmolLM2's adapter shapes whose
FedAvg the harness knows; the published global equals it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from mosquitto import find_mosquitto

from bench.fleet import SMOLLM2_135M, run_row
from bench.fleet_harness import SimulatedFleet, device_delta, lora_shapes, max_abs_diff
from fedmq_protocol import messages as m
from fedmq_protocol.signing import Verifier
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport
from fedmq_protocol.transport.config import BrokerConfig

SMALL = {"a.lora_A.weight": (4, 16), "a.lora_B.weight": (16, 4)}


def test_lora_shapes_are_the_tensors_peft_creates(tiny_llama):
    """Derived from config.json alone, the names and shapes are those of the agent's real adapter."""
    import json
    from pathlib import Path

    from edge_agent.methods import get_method

    for spec in (m.AdapterSpec(), m.AdapterSpec(r=4, target_modules=("q_proj", "k_proj", "o_proj", "down_proj"))):
        real = get_method("lora")(tiny_llama, spec, device="cpu", dtype="float32", seed=0).get_adapter()
        derived = lora_shapes(json.loads((Path(tiny_llama) / "config.json").read_text()), spec)
        assert derived == {k: v.shape for k, v in real.items()}
    # SmolLM2-135M, r=8 on q_proj/v_proj: the 0.46 M values the field notes give
    assert sum(int(np.prod(s)) for s in lora_shapes(SMOLLM2_135M, m.AdapterSpec()).values()) == 460_800
    with pytest.raises(ValueError, match=r"target_modules.*lm_head"):
        lora_shapes(SMOLLM2_135M, m.AdapterSpec(target_modules=("lm_head",)))


def test_devices_share_one_loop_thread_and_announce_signed_statuses(mqtt_broker):
    before = threading.active_count()
    fleet = SimulatedFleet([mqtt_broker.url], 30, federation="t", shapes=SMALL).start(timeout=30)
    topics = Topics("fedmq", "t")
    seen: dict[str, m.DeviceStatus] = {}
    got_all = threading.Event()

    def on_status(topic: str, payload: bytes) -> None:
        if payload:
            st = m.DeviceStatus.from_json(payload)
            seen[st.device_id] = st
            if len(seen) == 30:
                got_all.set()

    watcher = MqttTransport(BrokerConfig(url=mqtt_broker.url), "watch", clean_start=True)
    watcher.subscribe(topics.all_device_status, on_status, qos=1)
    try:
        assert threading.active_count() == before + 1  # 30 connections, one thread
        watcher.connect(10)
        assert got_all.wait(10), f"{len(seen)} of 30 statuses"
        verifier = Verifier.from_config(fleet.public_keys(), "t")
        for st in seen.values():
            assert st.online and st.state == "idle" and st.num_samples and st.num_samples >= 8
            verifier.verify_status(st)  # signed by the device's own key
        assert mqtt_broker.log_text().count("New client connected") >= 30
    finally:
        watcher.close()
        fleet.close()
    assert not fleet.errors


def test_twenty_devices_one_round_with_the_real_coordinator_global_equals_expected_fedavg(tmp_path):
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed")
    shapes = lora_shapes(SMOLLM2_135M, m.AdapterSpec())
    t0 = time.monotonic()
    row = run_row(20, tmp_path / "row", shapes, timeout_s=120, log=lambda _s: None)
    assert row["participants"] == 20 and row["updates_acked"] == 20
    counters = row["coordinator_counters"]
    assert counters["fit_accepted"] == 20 and counters["updates_rejected"] == 0 and counters["dropped"] == 0
    assert row["init_max_abs_diff"] == 0.0  # v0 is the adapter the devices initialise
    assert row["max_abs_diff_vs_expected"] <= 1e-6  # the published global is the harness's FedAvg
    # int2 of 460,800 values (+ a scale per 64): far below the 1.8 MB of float32
    assert 115_200 < row["update_bytes_mean"] < 200_000
    assert row["last_arrival_to_global_s"] > 0 and row["coordinator_peak_rss_mb"] > 0
    assert time.monotonic() - t0 < 60


def test_expected_aggregate_is_the_sample_weighted_mean_of_what_was_decoded():
    fleet = SimulatedFleet(["mqtt://127.0.0.1:1"], 3, federation="t", shapes=SMALL, signed=False)
    decoded = [d.builder.uplink.encoded.decode_dense(max_elements=1 << 20) for d in fleet.devices]
    n = np.array([d.num_samples for d in fleet.devices], np.float64)
    want = {k: fleet.init[k] + sum(w * x[k].astype(np.float64) for w, x in zip(n, decoded, strict=True)) / n.sum()
            for k in SMALL}
    assert max_abs_diff(fleet.expected_global(), want) < 1e-7
    # int2 keeps 4 levels per block of 64: what the coordinator decodes is not what was drawn, and
    # the fleet expects what it decodes
    assert max_abs_diff(decoded[0], device_delta(SMALL, 0, 0)) > 1e-5
