"""Fuzzing every decoder with seeded mutations of valid payloads, then a live coordinator's update
topic over Mosquitto.

In process (FUZZ_IN_PROCESS payloads, default 90 000): updates (every codec variant, evaluate,
init, zo), tasks, global snapshots and differences, zo ledger rounds, framed messages (whole,
manifests, chunks) and device status JSON go through the same decode and validation code the
coordinator and the agent run. Every call must return or raise ProtocolError (a crash is any other
exception), and whatever is accepted must be usable: tensors with the expected names and shapes,
finite values, indices in range, a signature only on the unmodified body. The kd payloads (fit
updates with top-k log-probs, tasks, probe sets, consensus; FUZZ_KD, default 10 000) likewise.

Live (FUZZ_LIVE payloads, default 10 000): a coordinator process with signatures required opens a
fit round for one (fake, torch-free) device, which publishes that many payloads on its update topic
before its real answer: byte/tree mutations of its signed update, updates that are invalid by
construction and correctly re-signed (so they reach tensor validation), and raw malformed frames.
The coordinator must survive (exit 0, no traceback), count every one as refused, and accept only
the real update (the new global is exactly the device's difference).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import time

import numpy as np

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.coordinator import Coordinator
from broker_coordinator.downlink import ServerModel
from broker_coordinator.intake import Collection
from broker_coordinator.state import FileStateStore
from broker_coordinator.strategy import RunningMean, mean_delta
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmq_protocol import messages as m
from fedmq_protocol.chunking import Reassembler, frame_payload, pack_chunk
from fedmq_protocol.codec import encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.globals import GlobalSync
from fedmq_protocol.modes.zo import ZoLedgerRound
from fedmq_protocol.seal import body_of
from fedmq_protocol.signing import Signer, body_digest, generate_keypair, new_nonce
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport, Published
from fedmq_protocol.transport.config import BrokerConfig
from tests import fuzzing as fz
from tests.fake_device import FakeDevice, read_retained_json, tiny_adapter, update_obj
from tests.federation import DENSE_DOWNLINK, coordinator_config, spawn, stop_all

FUZZ_IN_PROCESS = int(os.environ.get("FUZZ_IN_PROCESS", "90000"))
FUZZ_LIVE = int(os.environ.get("FUZZ_LIVE", "10000"))
MAX_BYTES = 1 << 20
FED = "test"
ADAPTER = tiny_adapter()
SHAPES = fz.shapes_of(ADAPTER)
NUMEL = sum(a.size for a in ADAPTER.values())


def _signer(tmp_path) -> tuple[Signer, str]:
    pem, pub = generate_keypair()
    (tmp_path / "dev-0.key").write_bytes(pem)
    return Signer.from_file(tmp_path / "dev-0.key"), pub


def _delta(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (0.01 * rng.standard_normal(s)).astype(np.float32) for k, s in SHAPES.items()}


def _check_decoded(dec, shapes) -> None:
    assert set(dec) == set(shapes)
    for k, t in dec.items():
        assert tuple(t.shape) == tuple(shapes[k]) and np.all(np.isfinite(t.values))
        if t.indices is not None:
            assert t.indices.size == t.values.size
            assert t.indices.size == 0 or (t.indices[0] >= 0 and t.indices[-1] < t.numel
                                           and np.all(np.diff(t.indices) > 0))


class _StubTransport:
    messages_rejected = 0
    connected = False

    def publish(self, *a, **kw):
        return Published(0, 0)


class _ProbeAgent(EdgeAgent):
    """The real agent event path (``_pump``), without a model: a valid task stops before training."""

    def _ensure_method(self, adapter):
        self.tasks_valid += 1
        raise _TaskReached


class _TaskReached(Exception):
    pass


def _agent(tmp_path) -> EdgeAgent:
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    cfg = AgentConfig(device_id="dev-0", model="tiny-llama", data={"train": train}, federation=FED,
                      state_dir=tmp_path / "agent", broker={"max_message_bytes": MAX_BYTES, "chunk_size": 65536})
    agent = _ProbeAgent(cfg, transport=_StubTransport())
    agent.tasks_valid = 0
    return agent


class Harness:
    """The decode paths. Updates go through real Coordinator instances (``_handle``, as on its
    update topic), one requiring signatures and one without keys (so that mutated bodies reach
    tensor validation); the other kinds through the agent-side decoders."""

    def __init__(self, signer: Signer, pub: str, tmp_path) -> None:
        self.task = m.Task(kind="fit", task_id="r1-fit-v0-a0", round=1, device_id="dev-0", global_version=0,
                           deadline_s=60, adapter=m.AdapterSpec(), nonce=new_nonce())
        self.signer = signer
        self.global_ = {k: np.zeros(s, np.float32) for k, s in SHAPES.items()}
        self.coords = {}
        for name, keys in (("signed", {"dev-0": pub}), ("open", {})):
            cfg = CoordinatorConfig(federation=FED, state_dir=tmp_path / name, device_keys=keys,
                                    broker={"max_message_bytes": MAX_BYTES, "chunk_size": 65536})
            coord = Coordinator(cfg, transport=_StubTransport(), store=FileStateStore(cfg.state_dir))
            coord.mode.server = ServerModel(self.global_, cfg.downlink, cfg.server_optimizer)
            self.coords[name] = coord
        self.topic = self.coords["signed"].topics.device_update("dev-0")
        self.agent = _agent(tmp_path)
        self.valid_digests: set[bytes] = set()
        self.accepted_invalid: list[str] = []
        self.reassembler = Reassembler(MAX_BYTES, 4 * MAX_BYTES, 60.0, max_transfers=8)

    def handle_update(self, payload: bytes, task: m.Task, which: str, invalid: bool) -> bool:
        """One payload on the update topic of coordinator ``which`` with ``task`` open."""
        coord = self.coords[which]
        base = task.global_version if task.kind != "init" else -1
        c = Collection(task.kind, task.task_id, task.round, base, {"dev-0"}, nonce=task.nonce)
        coord.rounds.open = c
        errors = coord.counters.errors
        coord._handle("update", self.topic, payload, time.time())
        coord.rounds.open = None
        if coord.counters.errors != errors:
            raise RuntimeError(f"coordinator error: {coord.counters.last_rejection}")
        if not c.accepted:
            raise ProtocolError(coord.counters.last_rejection)
        # the body as accepted (a fit update is folded into the round's running sum, which keeps
        # none of its tensors: the same bytes decode to what the intake checked and folded)
        upd = m.Update.from_msgpack(payload, max_bytes=MAX_BYTES)
        assert upd.device_id == c.accepted["dev-0"].device_id and upd.kind == c.accepted["dev-0"].kind
        if invalid:
            self.accepted_invalid.append(f"{which}: an update invalid by construction was accepted ({fz.LAST_APPLIED})")
        if which == "signed" and body_digest(upd.to_obj()) not in self.valid_digests:
            self.accepted_invalid.append("signed: a signature was accepted on a modified body")
        if upd.kind == "fit":
            dec = coord.mode.validate_update(upd)
            _check_decoded(dec, SHAPES)
            out = mean_delta(self.global_, [upd], [dec])
            assert all(np.all(np.isfinite(v)) for v in out.values())
            assert isinstance(c.running, RunningMean) and c.running.count == 1
            folded = c.running.mean()
            for k, v in out.items():
                np.testing.assert_allclose(folded[k], v, rtol=1e-6, atol=1e-7)
        return True

    def seeds(self) -> list[tuple[str, bytes, object, m.Task | None]]:
        out = []
        delta = _delta(1)
        for enc in fz.encodings(delta):
            obj = update_obj(self.task, "dev-0", None, federation=FED, signer=self.signer, tensors=enc)
            out.append(("update", fz.pack(obj), obj, self.task))
        evaluate = m.Task(**{**self.task.model_dump(by_alias=True), "kind": "evaluate", "task_id": "r1-evaluate-v0-a0"})
        init = m.Task(**{**self.task.model_dump(by_alias=True), "kind": "init", "global_version": -1})
        for t, arrays, extra in [(evaluate, None, {"metrics": {"eval_loss": 2.0}}), (init, ADAPTER, {}),
                                 (self.task, None, {"zo": fz.zo_update()})]:
            obj = update_obj(t, "dev-0", arrays, federation=FED, signer=self.signer, **extra)
            out.append(("update", fz.pack(obj), obj, t))
        zo_task = m.Task(**{**self.task.model_dump(by_alias=True), "zo": {"num_seeds": 8}, "task_id": "r1-fit-v0-a1"})
        for obj in (self.task.to_obj(), zo_task.to_obj()):
            out.append(("task", fz.pack(obj), obj, None))
        snap = m.GlobalModel(version=0, round=0, adapter=m.AdapterSpec(), tensors=encode(ADAPTER)).to_obj()
        out.append(("global", fz.pack(snap), snap, "snapshot"))
        for enc in fz.encodings(delta)[:4]:
            diff = m.GlobalModel(version=1, round=1, base_version=0, adapter=m.AdapterSpec(), tensors=enc).to_obj()
            out.append(("global", fz.pack(diff), diff, "diff"))
        led = fz.ledger().model_dump(by_alias=True, mode="python")
        out.append(("ledger", fz.pack(led), led, None))
        status = m.DeviceStatus(device_id="dev-0", online=True, seq=3, num_samples=10, resources={
            "cpu_count": 2, "cpu_percent": 1.0, "ram_total_mb": 1.0, "ram_available_mb": 1.0, "process_rss_mb": 1.0})
        out.append(("status", status.to_json(), None, None))
        big = fz.pack(out[0][2])
        for topic_suffix, frame in frame_payload(big, 512):
            out.append(("frame" + topic_suffix, frame, None, None))
        out.append(("frame", big, None, None))  # a whole message goes as is
        return out

    def run(self, kind: str, payload: bytes, task: m.Task | None = None, which: str = "signed",
            invalid: bool = False) -> bool:
        """True if accepted. Raises ProtocolError when refused; anything else is a crash."""
        if kind == "update":
            return self.handle_update(payload, task or self.task, which, invalid)
        if kind in ("task", "global"):  # through the agent's event loop, as received
            agent = self.agent
            topics = agent.topics
            if kind == "global":
                agent.sync = GlobalSync(max_elements=NUMEL * 4)
                agent.sync.offer(m.GlobalModel(version=0, round=0, adapter=m.AdapterSpec(), tensors=encode(ADAPTER)))
                topic = topics.global_diff(1) if task == "diff" else topics.global_model
            else:
                topic = topics.device_task("dev-0")
                agent._seen_tasks = []  # every task id is new: each payload goes the whole way
            refused, reached = sum(agent.rejected.values()), agent.tasks_valid
            agent._events.put((kind, topic, payload, time.time()))
            with contextlib.suppress(_TaskReached):
                agent._pump(0)
            if sum(agent.rejected.values()) != refused:
                raise ProtocolError("refused by the agent")
            if kind == "global":
                sync = agent.sync
                assert all(np.all(np.isfinite(a)) for a in sync.arrays.values())
                if sync.version == 1:
                    assert fz.shapes_of(sync.arrays) == SHAPES
            return agent.tasks_valid != reached or kind == "global"
        if kind == "ledger":
            ZoLedgerRound.from_msgpack(payload, max_bytes=MAX_BYTES).entries()
            return True
        if kind == "status":
            m.DeviceStatus.from_json(payload)
            return True
        if kind.startswith("frame"):
            topic = "fedmq/test/devices/dev-0/update" + kind[len("frame"):]
            self.reassembler.feed(topic, payload)
            assert self.reassembler.pending_bytes <= 4 * MAX_BYTES
            return True
        raise AssertionError(kind)


def test_decoders_survive_mutated_payloads(tmp_path, monkeypatch):
    for name in ("fedmq.coordinator", "fedmq.agent"):  # 10^5 rejections are logged as warnings
        monkeypatch.setattr(logging.getLogger(name), "level", logging.ERROR)
    signer, pub = _signer(tmp_path)
    h = Harness(signer, pub, tmp_path)
    seeds = h.seeds()
    for kind, payload, _, _ in seeds:
        if kind == "update":
            h.valid_digests.add(body_digest(m.Update.from_msgpack(payload).to_obj()))
    for kind, payload, obj, task in seeds:  # every seed is valid, for both coordinators
        both = kind == "update" and (task is None or task.kind != "fit" or obj.get("zo") is None)
        for which in (("signed", "open") if both else ("signed",)):
            if kind == "update" and obj.get("zo") is not None:
                continue  # a zo update in an adapter federation is refused (below, as a mutation seed)
            assert h.run(kind, payload, task, which)
    update_seeds = [sd for sd in seeds if sd[0] == "update"]
    rng = random.Random(20240601)
    crashes: list[str] = []
    counts = {"payloads": 0, "accepted": 0, "refused": 0, "invalid_by_construction": 0}
    by_kind: dict[str, int] = {}
    t0 = time.perf_counter()
    cases = [(k, p) for k in ("update", "task", "global", "ledger", "status", "frame") for p in fz.HANDCRAFTED]
    while counts["payloads"] < FUZZ_IN_PROCESS:
        task, which, invalid = None, rng.choice(["signed", "open"]), False
        if cases:
            kind, mutated = cases.pop()
            invalid = kind == "update"
        else:
            kind, payload, obj, task = rng.choice(update_seeds if rng.random() < 0.4 else seeds)
            if kind == "update" and rng.random() < 0.3:
                task = h.task
                bad, resignable, identity_only = fz.invalid_update(rng, seeds[0][2])  # the dense fp32 fit update
                if resignable and rng.random() < 0.6:
                    bad = fz.resign(signer, FED, bad)
                try:
                    mutated = fz.pack(bad)
                except (OverflowError, ValueError, TypeError):
                    continue
                invalid = which == "signed" or not identity_only
                counts["invalid_by_construction"] += invalid
            else:
                mutated = fz.mutate(rng, payload, obj)
        counts["payloads"] += 1
        by_kind[kind] = by_kind.get(kind, 0) + 1
        try:
            h.run(kind, mutated, task, which, invalid)
            counts["accepted"] += 1
        except ProtocolError:
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - this is what the test counts
            crashes.append(f"{kind}: {type(exc).__name__}: {exc} <- {mutated[:80].hex()}")
    elapsed = time.perf_counter() - t0
    signed, open_ = h.coords["signed"].counters, h.coords["open"].counters
    print(f"in-process fuzz: {counts} by kind {by_kind} in {elapsed:.1f}s, crashes {len(crashes)}, "
          f"accepted invalid {len(h.accepted_invalid)}; coordinator errors {signed.errors}/{open_.errors}, "
          f"signature rejections {signed.signature_rejected}")
    assert counts["payloads"] >= FUZZ_IN_PROCESS
    assert not crashes, crashes[:5]
    assert not h.accepted_invalid, h.accepted_invalid[:5]
    assert signed.errors == 0 and open_.errors == 0


class GlobalWatch:
    """Every global version as devices reconstruct it (snapshots and differences)."""

    def __init__(self, url: str, topics: Topics) -> None:
        self.url, self.topics, self.weights = url, topics, {}

    def start(self) -> None:
        sync = GlobalSync(max_elements=1 << 24)

        def on_global(topic: str, payload: bytes) -> None:
            if payload and sync.offer(m.GlobalModel.from_msgpack(body_of(payload))):
                self.weights[sync.version] = sync.arrays

        self.transport = MqttTransport(BrokerConfig(url=self.url), f"watch-{time.time_ns()}", clean_start=True)
        self.transport.subscribe(self.topics.global_model, on_global, qos=1, framed=True)
        self.transport.subscribe(self.topics.all_global_diffs, on_global, qos=1, framed=True)
        self.transport.connect(10)

    def close(self) -> None:
        self.transport.close()


def test_live_coordinator_refuses_every_fuzzed_update(mosquitto, tmp_path):
    broker = mosquitto(max_queued_messages=1_000_000)
    signer, pub = _signer(tmp_path)
    coord_cfg = coordinator_config(tmp_path, broker.url, rounds=1, min_clients=1, evaluate=False,
                                   round_deadline_s=float(os.environ.get("FUZZ_LIVE_DEADLINE_S", "400")),
                                   round_retries=0, device_keys={"dev-0": pub},
                                   downlink=DENSE_DOWNLINK)  # the new global is checked to be exactly the delta
    rng = random.Random(7)
    stats = {"published": 0, "raw_frames": 0, "mutated": 0, "invalid_resigned": 0, "skipped_equivalent": 0}
    delta = _delta(5)

    def flood(dev: FakeDevice, task: m.Task) -> None:
        valid = update_obj(task, "dev-0", delta, federation=FED, signer=signer)
        plain_valid = copy.deepcopy(valid)
        plain_payload = fz.pack(valid)
        canonical = body_digest(m.Update.from_msgpack(plain_payload).to_obj())
        topic = dev.topics.device_update("dev-0")
        while stats["published"] < FUZZ_LIVE:
            r = rng.random()
            if r < 0.05:  # malformed payloads: cut, retired framing, lying manifests, stray chunks
                frame = rng.choice([
                    fz.byte_mutate(rng, plain_payload)[:rng.randrange(1, 64)],
                    b"\x00" + plain_payload, b"\xfdW" + plain_payload,
                    fz.byte_mutate(rng, fz.pack({"fedmq_manifest": 1, "size": 1})),
                    fz.pack({"fedmq_manifest": 1, "transfer": b"x" * 16, "size": 2**40, "chunk_size": 1,
                             "chunks": 1, "chunk_sha256": [b"\x00" * 32], "sha256": b"\x00" * 32}),
                    pack_chunk(b"x" * 16, 0, plain_payload[:100]),  # a chunk on the message topic
                ])
                dev.transport.publish(topic, frame, qos=1)
                stats["raw_frames"] += 1
            elif r < 0.55:
                bad, resignable, _ = fz.invalid_update(rng, plain_valid)
                if resignable and rng.random() < 0.8:  # reaches the checks behind the signature
                    bad = fz.resign(signer, FED, bad)
                try:
                    payload = fz.pack(bad)
                except (OverflowError, ValueError, TypeError):
                    continue
                dev.transport.publish(topic, payload, qos=1)
                stats["invalid_resigned"] += 1
            else:
                payload = fz.mutate(rng, plain_payload, valid)
                try:  # a mutation that leaves the signed content unchanged is not an attack
                    if body_digest(m.Update.from_msgpack(payload).to_obj()) == canonical:
                        stats["skipped_equivalent"] += 1
                        continue
                except (ProtocolError, Exception):  # noqa: BLE001 - undecodable: certainly invalid
                    pass
                dev.transport.publish(topic, payload, qos=1)
                stats["mutated"] += 1
            stats["published"] += 1

    dev = FakeDevice(broker.url, "dev-0", federation=FED, signer=signer, delta=lambda t: delta,
                     before_fit_answer=flood)
    capture = GlobalWatch(broker.url, Topics("fedmq", FED))  # globals only (not the fuzzed updates)
    t0 = time.perf_counter()
    try:
        capture.start()
        dev.start()
        coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
        rc = coord.wait(timeout=500)
        log = (tmp_path / "coord.log").read_text()
        assert not dev.errors, dev.errors[0]
        assert rc == 0, log[-3000:]
        status = read_retained_json(broker.url, Topics("fedmq", FED).coordinator_status, m.CoordinatorStatus)
        time.sleep(0.3)
    finally:
        if "coord" in locals():
            stop_all([coord])
        dev.close()
        capture.close()
    elapsed = time.perf_counter() - t0
    c = status.counters
    print(f"live fuzz: {stats} in {elapsed:.1f}s; coordinator counters {c}")
    assert stats["published"] >= FUZZ_LIVE
    assert "Traceback" not in log and c["errors"] == 0, c
    # every fuzzed payload was refused (by the transport or by the coordinator), none accepted
    assert c["updates_rejected"] + c["frames_rejected"] == stats["published"], (c, stats)
    assert c["updates_accepted"] == 2, c  # the init answer and the one real update
    # the new global is exactly the real difference: nothing else got in
    assert sorted(capture.weights) == [0, 1]
    for k in SHAPES:
        np.testing.assert_allclose(capture.weights[1][k], capture.weights[0][k] + delta[k], rtol=0, atol=1e-7)


FUZZ_KD = int(os.environ.get("FUZZ_KD", "10000"))


def test_kd_decoders_survive_mutated_payloads(tmp_path):
    """Seeded mutations of valid kd payloads: fit updates through the kd coordinator's validation,
    consensus and probe-set messages through the agent's decoders, tasks through the task payload
    check. Each returns or raises ProtocolError; what is accepted is usable (finite, in range)."""
    import msgpack

    from broker_coordinator.modes import create_mode
    from fedmq_protocol.modes.kd import KdConsensus, KdProbeSet, KdTask

    probes = tmp_path / "probes.jsonl"
    probes.write_text(fz.kd_probe_lines())
    mode = create_mode(CoordinatorConfig.model_validate({"kd": {"probe_path": str(probes), "top_k": 8}}))
    seeds = fz.kd_seeds()

    def run(name: str, payload: bytes) -> None:
        if name == "update_fit_kd":
            got = mode.validate_update(m.Update.from_msgpack(payload, max_bytes=MAX_BYTES))
            assert got.ids.shape == got.logprobs.shape and got.ids.shape[0] == sum(mode.positions)
            assert np.all((got.ids >= 0) & (got.ids < mode.vocab_size)) and np.all(np.isfinite(got.logprobs))
        elif name == "kd_consensus":
            ids, probs = KdConsensus.from_msgpack(payload, max_bytes=MAX_BYTES).arrays()
            assert np.all(np.isfinite(probs)) and np.all(probs >= 0) and np.all(ids >= 0)
        elif name == "kd_probes":
            KdProbeSet.from_msgpack(payload, max_bytes=MAX_BYTES)
        else:
            m.Task.from_msgpack(payload, max_bytes=MAX_BYTES).payload_as(KdTask, "task")

    for name, payload in seeds.items():  # every seed is valid
        run(name, payload)
    assert mode.refused == {}
    rng = random.Random(20261201)
    names = sorted(seeds)
    objs = {n: msgpack.unpackb(p, raw=False) for n, p in seeds.items()}
    crashes: list[str] = []
    counts = {"accepted": 0, "refused": 0}
    for _ in range(FUZZ_KD):
        name = rng.choice(names)
        mutated = fz.mutate(rng, seeds[name], objs[name])
        try:
            run(name, mutated)
            counts["accepted"] += 1
        except ProtocolError:
            counts["refused"] += 1
        except Exception as exc:  # noqa: BLE001 - this is what the test counts
            crashes.append(f"{name}: {type(exc).__name__}: {exc} <- {mutated[:80].hex()}")
    print(f"kd fuzz: {counts}, refusals by reason {mode.refused}, crashes {len(crashes)}")
    assert not crashes, crashes[:5]
    assert counts["refused"] > FUZZ_KD // 4 and sum(mode.refused.values()) > 0
