"""Hierarchical aggregation on bridged brokers: site aggregators (`fedmq aggregator`) sum their
devices' fit updates into signed partial aggregates that cross a Mosquitto bridge; the coordinator
counts each partial as the updates of the devices it names.

Specified here: on three real Mosquittos (a central broker and two site brokers bridged to it with
the shipped bridge topics) the global equals flat FedAvg of the very updates the devices sent, and
no raw update reaches the central broker; partials with a bad signature, naming a device already
counted (directly or in another partial) or for another task are refused and counted; a
coordinator restarted after accepting a partial loses none of it; robust rules are refused at
config load, on both sides."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import yaml

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.counters import CoordinatorCounters
from broker_coordinator.intake import Collection, UpdateIntake
from broker_coordinator.modes import create_mode
from broker_coordinator.partials import PartialIntake
from broker_coordinator.site import SiteAggregatorConfig
from broker_coordinator.strategy import RunningMean
from fedmq.configfile import ConfigError, load_config
from fedmq_protocol import messages as m
from fedmq_protocol.codec import encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.partials import PartialAggregate, PartialMember, SiteStatus, encode_sums, sign_partial
from fedmq_protocol.signing import Signer, generate_keypair, load_public_key, new_nonce
from fedmq_protocol.topics import Topics
from tests.fake_device import FakeDevice, read_retained_json, tiny_adapter, update_obj
from tests.federation import DENSE_DOWNLINK, REPO, Capture, coordinator_config, spawn, stop_all, write_yaml
from tests.mosquitto import bridge_config

FED = "test"
TOPICS = Topics("fedmq", FED)


def keypair(tmp: Path, name: str) -> tuple[Path, str]:
    pem, pub = generate_keypair()
    path = tmp / f"{name}.key"
    path.write_bytes(pem)
    return path, pub


def delta_of(device_id: str, round_no: int) -> dict[str, np.ndarray]:
    """A device's fit difference in a round: distinct per device and round, known to the test."""
    rng = np.random.default_rng([int(device_id.split("-")[-1]), round_no])
    return {k: (rng.standard_normal(v.shape) * 0.01).astype(np.float32) for k, v in tiny_adapter().items()}


def samples_of(device_id: str) -> int:
    return 5 + 7 * int(device_id.split("-")[-1])


class SiteDevice(FakeDevice):
    """A fake device whose fit answer is ``delta_of`` with ``samples_of`` samples (answer_fit False:
    it records fit tasks without answering them)."""

    answer_fit: bool = True

    def _answer_task(self, task: m.Task) -> None:
        if task.kind == "fit":
            if not self.answer_fit:
                return
            obj = update_obj(task, self.device_id, delta_of(self.device_id, task.round), federation=self.federation,
                             signer=self.signer, num_samples=samples_of(self.device_id))
            self.publish_update(msgpack.packb(obj, use_bin_type=True))
        else:
            super()._answer_task(task)


def flat_fedavg(start: dict[str, np.ndarray], rounds: int, devices: list[str]) -> dict[int, dict[str, np.ndarray]]:
    """Globals v1..v{rounds}: each version + sum_i n_i delta_i / sum_i n_i in float64 (plain FedAvg)."""
    out, w = {}, {k: v.astype(np.float64) for k, v in start.items()}
    total = sum(samples_of(d) for d in devices)
    for r in range(1, rounds + 1):
        w = {k: v + sum(samples_of(d) * delta_of(d, r)[k].astype(np.float64) for d in devices) / total
             for k, v in w.items()}
        out[r] = w
    return out


def site_yaml(tmp: Path, site: str, url: str, key: Path, **extra) -> Path:
    return write_yaml(tmp / f"{site}.yaml", {"site_id": site, "federation": FED, "broker": {"url": url},
                                            "signing_key": str(key), "flush_margin_s": 5.0, "settle_s": 2.0,
                                            **extra})


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_hierarchical_global_equals_flat_fedavg_on_bridged_mosquittos(mosquitto, tmp_path):
    central = mosquitto()
    sites = {s: mosquitto(extra_config=bridge_config(central, f"bridge-{s}")) for s in ("site-a", "site-b")}
    for s in sites:
        wait_for(lambda s=s: f"as bridge-{s}" in central.log_text(), 20, f"the bridge of {s}")
    coordinator_key, coordinator_pub = keypair(tmp_path, "coordinator")
    keys = {s: keypair(tmp_path, s) for s in sites}
    members = {"site-a": ["dev-0", "dev-1"], "site-b": ["dev-2", "dev-3"]}
    procs, devices = [], []
    capture = Capture(central.url, TOPICS).start()  # the central broker: globals, and any raw update
    try:
        for s, broker in sites.items():
            cfg = site_yaml(tmp_path, s, broker.url, keys[s][0], coordinator_public_key=coordinator_pub)
            procs.append(spawn(["aggregator", "--config", str(cfg)], tmp_path / f"{s}.log"))
        for s in sites:
            wait_for(lambda s=s: "aggregating on" in (tmp_path / f"{s}.log").read_text(), 30, f"aggregator {s}")
        for s, ids in members.items():
            devices += [SiteDevice(sites[s].url, d, federation=FED).start() for d in ids]
        coord_cfg = coordinator_config(
            tmp_path, central.url, rounds=2, min_clients=4, round_deadline_s=60, wait_for_devices_s=60,
            downlink=DENSE_DOWNLINK, coordinator_key=str(coordinator_key),
            aggregator_keys={s: pub for s, (_, pub) in keys.items()})
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
        procs.append(coord)
        rc = coord.wait(timeout=150)
        log = (tmp_path / "coord.log").read_text()
        assert rc == 0, log[-3000:]
        status = read_retained_json(central.url, TOPICS.coordinator_status, m.CoordinatorStatus)
        time.sleep(0.3)
    finally:
        stop_all(procs)
        for d in devices:
            d.close()
        capture.close()
    # each aggregator's retained status crossed its bridge; its Will / last words say it is gone
    site_status = {s: read_retained_json(central.url, TOPICS.site_status(s), SiteStatus) for s in sites}
    for s, st in site_status.items():
        assert st is not None and not st.online and st.global_version == 2 and st.devices == 2, (s, st)
        assert st.counters["partials_sent"] == 2 and st.counters["fit_accepted"] == 4, (s, st.counters)
        assert st.counters["updates_rejected"] == 0 and st.counters["relayed"] == (s == "site-a"), (s, st.counters)
    site_logs = {s: (tmp_path / f"{s}.log").read_text() for s in sites}
    for s, text in site_logs.items():
        assert "Traceback" not in text, text[-3000:]
        assert f"site {s}: partial 0 of r1-fit-v0-a0 published: 2 device(s)" in text, text[-3000:]
    assert "Traceback" not in log
    c = status.counters
    assert c["fit_accepted"] == 8 and c["partials_accepted"] == 4, c  # 2 rounds x 2 sites x 2 devices
    assert c["updates_rejected"] == 0 and c["partials_rejected"] == 0 and c["errors"] == 0, c
    assert capture.updates == [], "raw device updates crossed the bridge"
    assert [r.participants for r in capture.rounds if r.round > 0][-1] == ("dev-0", "dev-1", "dev-2", "dev-3")
    reference = flat_fedavg(capture.weights[0], 2, [d for ids in members.values() for d in ids])
    diffs = [float(np.max(np.abs(capture.weights[v][k].astype(np.float64) - reference[v][k])))
             for v in (1, 2) for k in reference[v]]
    assert max(diffs) < 1e-6, max(diffs)  # the float32 rounding of the published global: 1.7e-7 seen
    moved = max(float(np.max(np.abs(capture.weights[2][k] - capture.weights[0][k]))) for k in reference[2])
    assert moved > 1e-3  # the globals did move


# ------------------------------------------------------------------ the coordinator's partial intake


def _coordinator_mode(**cfg):
    mode = create_mode(CoordinatorConfig(federation=FED, **cfg))
    mode.adopt_initial(tiny_adapter())  # global v0
    return mode


def _partial(c: Collection, site: str, devices: list[str], signer: Signer, *, seq: int = 0, **fields) -> bytes:
    running = RunningMean(tiny_adapter())
    for d in devices:
        running.add(samples_of(d), encode(delta_of(d, c.round_no)).decode(max_elements=1 << 20))
    kw = {"site_id": site, "seq": seq, "task_id": c.task_id, "round": c.round_no, "base_version": c.base_version,
          "nonce": c.nonce, "total_weight": running.total, "sums": encode_sums(running.sums, running.shapes),
          "members": tuple(PartialMember(device_id=d, num_samples=samples_of(d), metrics={"train_loss": 1.0})
                           for d in devices)}
    kw.update(fields)
    return sign_partial(PartialAggregate(**kw), FED, signer)


def test_partials_with_a_bad_signature_a_device_counted_twice_or_another_task_are_refused(tmp_path):
    (ka, pa), (kb, pb) = keypair(tmp_path, "site-a"), keypair(tmp_path, "site-b")
    sa, sb = Signer.from_file(ka), Signer.from_file(kb)
    mode = _coordinator_mode()
    counters = CoordinatorCounters()
    partials = PartialIntake(TOPICS, mode, counters, max_message_bytes=1 << 24,
                             aggregator_keys={"site-a": load_public_key(pa), "site-b": load_public_key(pb)})
    intake = UpdateIntake(TOPICS, mode, counters, max_message_bytes=1 << 24)
    c = Collection("fit", "r1-fit-v0-a0", 1, 0, {"dev-0", "dev-1", "dev-2", "dev-3", "dev-4"}, nonce=new_nonce())
    a, b = TOPICS.site_partial("site-a"), TOPICS.site_partial("site-b")

    def refused(topic: str, payload: bytes) -> str:
        with pytest.raises(ProtocolError) as ei:
            partials.receive(topic, payload, time.time(), c)
        return str(ei.value)

    assert "does not verify with the aggregator's key" in refused(a, _partial(c, "site-a", ["dev-0"], sb))
    assert "no aggregator key for site 'site-c'" in refused(
        TOPICS.site_partial("site-c"), _partial(c, "site-c", ["dev-0"], sa))
    assert "published on" in refused(b, _partial(c, "site-a", ["dev-0"], sa))  # another site's topic
    other = Collection("fit", "r1-fit-v0-a1", 1, 0, set(c.expected), nonce=new_nonce())
    assert "is not open" in refused(a, _partial(other, "site-a", ["dev-0"], sa))  # another task
    replayed = _partial(c, "site-a", ["dev-0"], sa, nonce=other.nonce)  # signed, but for another fan-out
    assert "another task's nonce" in refused(a, replayed)
    assert counters.partial_signature_rejected == 3 and not c.accepted

    good = _partial(c, "site-a", ["dev-0", "dev-1"], sa)
    assert partials.receive(a, good, time.time(), c) is not None
    assert sorted(c.accepted) == ["dev-0", "dev-1"] and c.via_partial["dev-0"] == "partial~r1-fit-v0-a0~site-a~0"
    assert partials.receive(a, good, time.time(), c) is None and counters.duplicates == 1  # a second copy
    # dev-1 is counted in site-a's partial: another partial naming it is refused, nothing of it taken
    assert "dev-1 is already counted in partial~r1-fit-v0-a0~site-a~0" in refused(
        b, _partial(c, "site-b", ["dev-2", "dev-1"], sb))
    assert "dev-2" not in c.accepted
    # ... and so is dev-0's own update
    def direct(device_id: str) -> bytes:
        task = m.Task(kind="fit", task_id=c.task_id, round=1, device_id=device_id, global_version=0, deadline_s=60,
                      adapter=m.AdapterSpec(), nonce=c.nonce)
        obj = update_obj(task, device_id, delta_of(device_id, 1), federation=FED, num_samples=samples_of(device_id))
        return msgpack.packb(obj, use_bin_type=True)

    with pytest.raises(ProtocolError, match="dev-0 is already counted in partial"):
        intake.receive(TOPICS.device_update("dev-0"), direct("dev-0"), time.time(), c)
    # a device that answered directly cannot be counted again in a partial
    assert intake.receive(TOPICS.device_update("dev-3"), direct("dev-3"), time.time(), c)
    assert "dev-3 is already counted in its own update" in refused(b, _partial(c, "site-b", ["dev-3"], sb))
    assert counters.counted_twice == 3
    assert "not selected" in refused(b, _partial(c, "site-b", ["dev-9"], sb))
    assert "total weight" in refused(b, _partial(c, "site-b", ["dev-2"], sb, total_weight=999.0))
    assert "clip_norm 1.0" in refused(b, _partial(c, "site-b", ["dev-2"], sb, clip_norm=1.0))
    assert partials.receive(b, _partial(c, "site-b", ["dev-2", "dev-4"], sb), time.time(), c) is not None
    # the round's mean is flat FedAvg of the five updates
    mean = c.running.mean()
    ids = ["dev-0", "dev-1", "dev-2", "dev-3", "dev-4"]
    total = sum(samples_of(d) for d in ids)
    for k, v in mean.items():
        ref = sum(samples_of(d) * delta_of(d, 1)[k].astype(np.float64) for d in ids) / total
        assert np.max(np.abs(v - ref)) < 1e-12


def test_robust_rules_cannot_be_pre_aggregated_refused_at_config_load(tmp_path):
    key, pub = keypair(tmp_path, "site-a")
    for aggregation, why in [({"rule": "median"}, "rule median"), ({"rule": "trimmed_mean"}, "rule trimmed_mean"),
                             ({"clip_median_factor": 2.0}, "clip_median_factor")]:
        coord = write_yaml(tmp_path / "coordinator.yaml", {"federation": FED, "aggregator_keys": {"site-a": pub},
                                                           "aggregation": aggregation})
        with pytest.raises(ConfigError) as ei:
            load_config(coord, CoordinatorConfig)
        assert "sites cannot pre-aggregate" in str(ei.value) and why in str(ei.value)
        assert "\n" not in str(ei.value)
        site = site_yaml(tmp_path, "site-a", "mqtt://127.0.0.1:1883", key, aggregation=aggregation)
        with pytest.raises(ConfigError) as ei:
            load_config(site, SiteAggregatorConfig)
        assert "a site cannot pre-aggregate" in str(ei.value) and why in str(ei.value)
    # the shipped example validates once its key exists; a fixed clip_norm is linear and allowed
    example = yaml.safe_load((REPO / "configs" / "site.yaml").read_text())
    example.update(signing_key=str(key), aggregation={"clip_norm": 1.0})
    cfg = load_config(write_yaml(tmp_path / "site.yaml", example), SiteAggregatorConfig)
    assert cfg.site_id == "site-a" and cfg.client_id == "aggregator-site-a"
    assert load_config(write_yaml(tmp_path / "c.yaml", {"aggregator_keys": {"site-a": pub},
                                                       "aggregation": {"clip_norm": 1.0}}), CoordinatorConfig)


def test_a_coordinator_restarted_after_accepting_a_partial_loses_nothing(mosquitto, tmp_path):
    """dev-0 answers directly; dev-1 and dev-2 are counted in a partial of site-a; the coordinator
    is stopped while dev-0 has not answered, restarted on its state directory, and ends the round
    with the partial it journalled and dev-0's update: the global is FedAvg of all three."""
    from broker_coordinator.coordinator import Coordinator

    broker = mosquitto()
    key, pub = keypair(tmp_path, "site-a")
    signer = Signer.from_file(key)
    path = coordinator_config(tmp_path, broker.url, rounds=1, min_clients=3, round_deadline_s=60,
                              wait_for_devices_s=30, evaluate=False, downlink=DENSE_DOWNLINK,
                              aggregator_keys={"site-a": pub})
    cfg = load_config(path, CoordinatorConfig)
    devs = [SiteDevice(broker.url, f"dev-{i}", federation=FED) for i in range(3)]
    for d in devs:
        d.answer_fit = False
        d.start()
    capture = Capture(broker.url, TOPICS).start()

    def run_in_thread(coord: Coordinator) -> threading.Thread:
        t = threading.Thread(target=lambda: _run_quietly(coord), daemon=True)
        t.start()
        return t

    first = Coordinator(cfg)
    t = run_in_thread(first)
    try:
        wait_for(lambda: all(any(k.kind == "fit" for k in d.tasks) for d in devs), 30, "the fit tasks")
        task = next(k for k in devs[1].tasks if k.kind == "fit")
        c = Collection("fit", task.task_id, task.round, task.global_version, set(), nonce=task.nonce)
        forged = _partial(c, "site-a", ["dev-1", "dev-2"], Signer.from_file(keypair(tmp_path, "mallory")[0]))
        capture.transport.publish(TOPICS.site_partial("site-a"), forged, qos=1, framed=True)
        capture.transport.publish(TOPICS.site_partial("site-a"), _partial(c, "site-a", ["dev-1", "dev-2"], signer),
                                  qos=1, framed=True)
        wait_for(lambda: first.counters.partials_accepted == 1, 10, "the partial accepted")
        assert first.counters.partials_rejected == 1 and first.counters.partial_signature_rejected == 1
        first.stop()
        t.join(10)
        first.close()
        second = Coordinator(cfg)
        devs[0].answer_fit = True  # dev-0 answers the task the restarted coordinator sends again
        t = run_in_thread(second)
        t.join(60)
        assert not t.is_alive()
        time.sleep(0.3)
    finally:
        for d in devs:
            d.close()
        capture.close()
    assert second.counters.restored == 2 and second.counters.fit_accepted == 1, second.counters
    assert second.state.round_completed == 1
    assert second.state.history[-1].participants == ("dev-0", "dev-1", "dev-2")
    reference = flat_fedavg(capture.weights[0], 1, ["dev-0", "dev-1", "dev-2"])[1]
    for k, v in reference.items():
        assert np.max(np.abs(capture.weights[1][k] - v)) < 1e-6


def _run_quietly(coord) -> None:
    with contextlib.suppress(Exception):  # the first coordinator is stopped mid-round on purpose
        coord.run()


# ------------------------------------------------------------------ the aggregator's own checks and flushes


class RecordingTransport:
    """What a SiteAggregator publishes, recorded (its decisions are driven directly below)."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.on_connect: list = []
        self.connected = True

    def publish(self, topic: str, payload: bytes, **kw) -> None:
        self.published.append((topic, payload))

    def close(self) -> None:
        self.connected = False

    def partials(self) -> list[PartialAggregate]:
        return [PartialAggregate.from_msgpack(p) for t, p in self.published if t == TOPICS.site_partial("site-a")]


def test_the_aggregator_checks_updates_and_sends_late_ones_in_a_second_partial(tmp_path):
    from broker_coordinator.site import SiteAggregator
    from fedmq_protocol.seal import Sealer

    key, pub = keypair(tmp_path, "site-a")
    k0, p0 = keypair(tmp_path, "dev-0")
    dev0 = Signer.from_file(k0)
    mallory = Signer.from_file(keypair(tmp_path, "mallory")[0])
    cfg = load_config(site_yaml(tmp_path, "site-a", "mqtt://127.0.0.1:1", key, devices=["dev-0", "dev-1", "dev-2"],
                                device_keys={"dev-0": p0}, require_signatures=False), SiteAggregatorConfig)
    tr = RecordingTransport()
    agg = SiteAggregator(cfg, transport=tr)
    sealer = Sealer(FED)
    g0 = m.GlobalModel(version=0, round=0, adapter=m.AdapterSpec(), tensors=tiny_adapter())
    agg.on_global(TOPICS.global_model, sealer.seal(TOPICS.global_model, g0.to_msgpack(), round_no=0, version=0))
    nonce = new_nonce()
    tasks = {d: m.Task(kind="fit", task_id="r1-fit-v0-a0", round=1, device_id=d, global_version=0, deadline_s=30,
                       adapter=m.AdapterSpec(), nonce=nonce) for d in ("dev-0", "dev-1", "dev-2", "dev-7")}
    for d, task in tasks.items():  # dev-7 is behind another site: its task is ignored
        topic = TOPICS.device_task(d)
        agg.on_task(topic, sealer.seal(topic, task.to_msgpack(), round_no=1, version=0))
    fo = agg.fanouts["r1-fit-v0-a0"]
    assert fo.collection.expected == {"dev-0", "dev-1", "dev-2"} and agg.counters.tasks_seen == 3

    def send(device_id: str, signer: Signer | None = None, **fields) -> None:
        obj = update_obj(tasks[device_id], device_id, delta_of(device_id, 1), federation=FED, signer=signer,
                         num_samples=samples_of(device_id), **fields)
        agg._handle("update", TOPICS.device_update(device_id), msgpack.packb(obj, use_bin_type=True), time.time())

    send("dev-0", mallory)  # another key than dev-0's
    send("dev-0", dev0, round=2)  # signed, but does not match its task
    send("dev-0", dev0, task_id="r1-fit-v0-a9")  # a task this site never saw
    send("dev-7")  # not a device of this site
    assert agg.counters.updates_rejected == 4 and agg.counters.signature_rejected == 1 and not fo.collection.accepted
    send("dev-0", dev0)
    send("dev-0", dev0)  # a second copy
    send("dev-1")
    assert sorted(fo.collection.accepted) == ["dev-0", "dev-1"] and agg.counters.duplicates == 1
    now = time.monotonic()
    agg.tick(now)
    assert tr.partials() == []  # dev-2 has not answered and the flush time is not here
    agg.tick(fo.flush_at)
    first = tr.partials()
    assert [p.device_ids for p in first] == [("dev-0", "dev-1")] and first[0].seq == 0
    send("dev-2")  # after the flush: the next partial
    agg.tick(fo.flush_at + 0.1)
    partials = tr.partials()
    assert [(p.seq, p.device_ids) for p in partials] == [(0, ("dev-0", "dev-1")), (1, ("dev-2",))]
    # the next attempt: dev-2 went offline, so the partial goes up once dev-0 and dev-1 answered
    for d in ("dev-0", "dev-1", "dev-2"):
        tasks[d] = tasks[d].model_copy(update={"task_id": "r1-fit-v0-a1"})
        agg.on_task(TOPICS.device_task(d), sealer.seal(TOPICS.device_task(d), tasks[d].to_msgpack(), round_no=1,
                                                       version=0))
    retry = agg.fanouts["r1-fit-v0-a1"]
    offline = m.DeviceStatus(device_id="dev-2", online=False, seq=1, state="offline", will=True)
    agg._handle("status", TOPICS.device_status("dev-2"), offline.to_json(), time.time())
    send("dev-0", dev0)
    send("dev-1")
    agg.tick(retry.last_task_at + cfg.settle_s / 2)
    assert len(tr.partials()) == 2  # the settle time has not passed
    agg.tick(retry.last_task_at + cfg.settle_s)
    assert tr.partials()[-1].task_id == "r1-fit-v0-a1" and tr.partials()[-1].device_ids == ("dev-0", "dev-1")
    agg.tick(retry.last_task_at + cfg.settle_s + 1)
    assert len(tr.partials()) == 3  # nothing new: no partial
    eval_task = tasks["dev-1"].model_copy(update={"kind": "evaluate", "task_id": "r1-evaluate-v1-a0"})
    obj = update_obj(eval_task, "dev-1", None, federation=FED, metrics={"eval_loss": 0.5})
    agg._handle("update", TOPICS.device_update("dev-1"), msgpack.packb(obj, use_bin_type=True), time.time())
    assert tr.published[-1][0] == TOPICS.site_relay("site-a", "dev-1") and agg.counters.relayed == 1

    # the coordinator takes both partials; its mean is flat FedAvg of the three updates
    c = Collection("fit", "r1-fit-v0-a0", 1, 0, {"dev-0", "dev-1", "dev-2"}, nonce=nonce)
    intake = PartialIntake(TOPICS, _coordinator_mode(), CoordinatorCounters(), max_message_bytes=1 << 24,
                           aggregator_keys={"site-a": load_public_key(pub)})
    for topic, payload in tr.published:
        if topic == TOPICS.site_partial("site-a") and b"r1-fit-v0-a0" in payload:
            assert intake.receive(topic, payload, time.time(), c) is not None
    ids = ["dev-0", "dev-1", "dev-2"]
    total = sum(samples_of(d) for d in ids)
    for k, v in c.running.mean().items():
        ref = sum(samples_of(d) * delta_of(d, 1)[k].astype(np.float64) for d in ids) / total
        assert np.max(np.abs(v - ref)) < 1e-12
