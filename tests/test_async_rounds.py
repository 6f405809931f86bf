"""Asynchronous (FedBuff) rounds: devices train continuously, the coordinator folds each accepted
update into a buffer weighted by its staleness and publishes a new global every buffer_size updates.

The coordinator runs in-process on a real Mosquitto with torch-free fake devices of different
speeds; every global it produces is compared with a plain numpy FedBuff written here from the
arrival order the coordinator saw (each update's base version and difference). Stale updates are
refused with their reason and leave the buffer alone; a coordinator restarted mid-buffer refolds
the journal and ends on the global an uninterrupted run gets from the same arrivals. One run with
real agent processes (tiny model) closes the file."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import threading
import time

import msgpack
import numpy as np
import pytest
import yaml

from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.coordinator import Coordinator
from broker_coordinator.staleness import staleness_weight
from broker_coordinator.state import FileStateStore
from edge_agent.data import synthesize
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from tests.fake_device import FakeDevice, tiny_adapter, update_obj
from tests.federation import REPO, agent_config, coordinator_config, spawn, stop_all

SAMPLES = {"d0": 10, "d1": 25, "d2": 40}


class Device(FakeDevice):
    """A fake device with its own sample count, answering each fit task after ``delay_s`` with a
    difference determined by its task (the same task answered twice sends the same bytes)."""

    def __init__(self, url: str, device_id: str, delay_s: float, sent: dict[str, dict[str, np.ndarray]],
                 gate=None) -> None:
        super().__init__(url, device_id)
        self.delay_s, self.sent_deltas, self.gate = delay_s, sent, gate
        self.delta = self._delta
        self.before_fit_answer = self._wait

    def _delta(self, task: m.Task) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([sum(map(ord, task.task_id)), len(task.task_id), task.global_version,
                                     int(self.device_id[1:])])
        d = {k: (0.01 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in self.adapter.items()}
        self.sent_deltas[task.task_id] = d
        return d

    def _wait(self, dev: FakeDevice, task: m.Task) -> None:
        if self.gate is not None:
            self.gate(task)
        time.sleep(self.delay_s)

    def answer(self, task: m.Task, arrays: dict[str, np.ndarray] | None) -> bytes:
        obj = update_obj(task, self.device_id, arrays, federation=self.federation,
                         num_samples=SAMPLES.get(self.device_id, 10))
        payload = msgpack.packb(obj, use_bin_type=True)
        self.publish_update(payload)
        return payload


def _config(tmp_path, url: str, **asynchronous) -> CoordinatorConfig:
    return CoordinatorConfig(
        federation="test", broker={"url": url}, state_dir=tmp_path / "coordinator", evaluate=False, min_clients=1,
        round_deadline_s=30, wait_for_devices_s=30, rounds=6,
        asynchronous={"enabled": True, **asynchronous})


class Run:
    """An in-process coordinator whose arrivals (update payloads it took up: accepted or refused as
    stale, in the order it handled them) and exact globals (per version) are recorded. ``stop_after``:
    it stops once that many fit updates were accepted and handles nothing more, as if it had crashed
    (what the broker delivered after that point is lost with it)."""

    def __init__(self, cfg: CoordinatorConfig, stop_after: int | None = None) -> None:
        self.coord = Coordinator(cfg, store=FileStateStore(cfg.state_dir), on_round=self._on_round)
        self.globals: dict[int, dict[str, np.ndarray]] = {}
        self.arrivals: list[m.Update] = []
        self.refusals: list[str] = []
        self.version_event: dict[int, threading.Event] = {}
        self.crashed = False
        inner = self.coord.rounds.on_update

        def on_update(topic: str, payload: bytes, arrived_at: float) -> None:
            if self.crashed:
                return
            log = self.coord.rounds.accepted_log  # type: ignore[attr-defined]
            before = len(log)
            try:
                inner(topic, payload, arrived_at)
            except ProtocolError as exc:
                if "refused as stale" in str(exc):
                    self.arrivals.append(m.Update.from_msgpack(payload))
                self.refusals.append(str(exc))
                raise
            if len(log) > before:  # taken into a buffer
                self.arrivals.append(m.Update.from_msgpack(payload))
            if stop_after is not None and self.coord.counters.fit_accepted >= stop_after:
                self.crashed = True
                self.coord.stop()

        self.coord.rounds.on_update = on_update  # type: ignore[method-assign]

    def _on_round(self, summary: m.RoundSummary) -> None:
        server = self.coord.mode.server  # type: ignore[attr-defined]
        self.globals[summary.global_version] = {k: v.copy() for k, v in server.exact.items()}
        self.version_event.setdefault(summary.global_version, threading.Event()).set()

    def wait_version(self, v: int, timeout: float) -> bool:
        return self.version_event.setdefault(v, threading.Event()).wait(timeout)

    def run(self, timeout: float = 90) -> None:
        t = threading.Thread(target=self.coord.run, daemon=True)
        t.start()
        t.join(timeout)
        assert not t.is_alive(), "the coordinator did not finish"
        self.coord.close()


def reference_fedbuff(initial: dict[str, np.ndarray], arrivals: list[m.Update],
                      deltas: dict[str, dict[str, np.ndarray]], *, buffer_size: int, max_staleness: int,
                      weighting: str, lr: float = 1.0, start_version: int = 0):
    """Plain FedBuff: x_{k+1} = x_k + lr * sum_i n_i w(s_i) delta_i / sum_i n_i over each buffer of
    ``buffer_size`` updates, s_i = k - base_i, refusing s_i > max_staleness. Returns the globals by
    version, the refused task ids and the updates left in the buffer."""
    x = {k: v.astype(np.float32) for k, v in initial.items()}
    version, buf, out, refused = start_version, [], {}, []
    for u in arrivals:
        s = version - u.base_version
        if s > max_staleness:
            refused.append(u.task_id)
            continue
        w = 1.0 if weighting == "constant" else 1.0 / math.sqrt(1.0 + s)
        buf.append((u.num_samples, w, deltas[u.task_id]))
        if len(buf) == buffer_size:
            total = float(sum(n for n, _, _ in buf))
            for k in x:
                mean = sum(n * w * d[k].astype(np.float64) for n, w, d in buf) / total
                x[k] = (x[k].astype(np.float64) + lr * mean).astype(np.float32)
            version += 1
            out[version] = {k: v.copy() for k, v in x.items()}
            buf = []
    return out, refused, buf


def _assert_same_globals(got: dict[int, dict[str, np.ndarray]], want: dict[int, dict[str, np.ndarray]]) -> None:
    assert got, "no global was published"
    for v, g in got.items():
        assert v in want, f"v{v} published but the reference has versions {sorted(want)}"
        for k in g:
            np.testing.assert_allclose(g[k], want[v][k], rtol=0, atol=2e-7, err_msg=f"v{v} {k}")


def test_fedbuff_globals_equal_a_plain_reference_of_the_same_arrivals(mosquitto, tmp_path):
    broker = mosquitto()
    cfg = _config(tmp_path, broker.url, buffer_size=2, concurrency=3, max_staleness=3, versions=6)
    deltas: dict[str, dict[str, np.ndarray]] = {}
    devices = [Device(broker.url, f"d{i}", delay, deltas).start() for i, delay in enumerate((0.0, 0.08, 0.25))]
    run = Run(cfg)
    try:
        run.run()
    finally:
        for d in devices:
            d.close()
    assert not any(d.errors for d in devices)
    want, refused, _ = reference_fedbuff(tiny_adapter(), run.arrivals, deltas, buffer_size=2, max_staleness=3,
                                         weighting="sqrt")
    assert sorted(run.globals) == list(range(1, 7))
    _assert_same_globals(run.globals, want)
    log = run.coord.rounds.accepted_log
    assert [a.task_id for a in log] == [u.task_id for u in run.arrivals if u.task_id not in refused]
    # the devices' speeds make some updates stale, and those weigh less
    assert any(a.staleness > 0 for a in log), [a.staleness for a in log]
    assert all(a.weight == pytest.approx(1 / math.sqrt(1 + a.staleness)) for a in log)
    # every device trained, the fast one more often; at most `concurrency` tasks out at once
    counts = {d.device_id: sum(a.device_id == d.device_id for a in log) for d in devices}
    assert all(counts.values()) and counts["d0"] > counts["d2"], counts
    state = FileStateStore(cfg.state_dir).load()
    assert state is not None and state.round_completed == 6 and state.global_version == 6
    assert [h.global_version for h in state.history] == list(range(1, 7))


def test_an_update_older_than_max_staleness_is_refused_with_its_reason_and_leaves_the_buffer(mosquitto, tmp_path):
    broker = mosquitto()
    cfg = _config(tmp_path, broker.url, buffer_size=2, concurrency=3, max_staleness=1, versions=5,
                  staleness_weighting="constant")
    deltas: dict[str, dict[str, np.ndarray]] = {}
    run: Run

    def hold_first_task(task: m.Task) -> None:  # the slow device answers its v0 task once v3 exists
        if task.global_version == 0:
            assert run.wait_version(3, 30)

    run = Run(cfg)
    devices = [Device(broker.url, "d0", 0.0, deltas).start(), Device(broker.url, "d1", 0.02, deltas).start(),
               Device(broker.url, "d2", 0.0, deltas, gate=hold_first_task).start()]
    try:
        run.run()
    finally:
        for d in devices:
            d.close()
    assert not any(d.errors for d in devices), [d.errors for d in devices]
    want, refused, _ = reference_fedbuff(tiny_adapter(), run.arrivals, deltas, buffer_size=2, max_staleness=1,
                                         weighting="constant")
    slow_first = next(u for u in run.arrivals if u.device_id == "d2")
    assert slow_first.base_version == 0 and slow_first.task_id in refused
    counters = run.coord.counters
    assert counters.stale == len(refused) >= 1
    assert counters.updates_rejected >= counters.stale
    stale_reasons = [r for r in run.refusals if "refused as stale" in r]
    assert len(stale_reasons) == len(refused)
    assert f"task {slow_first.task_id} trained on global v0" in stale_reasons[0]
    assert "asynchronous.max_staleness 1" in stale_reasons[0]
    assert any("refused as stale" in reason for reason in run.coord.rejections.by_reason), \
        run.coord.rejections.by_reason
    # the refused update is in no buffer: the globals are the reference's, which skipped it
    assert slow_first.task_id not in {a.task_id for a in run.coord.rounds.accepted_log}
    assert all(a.weight == 1.0 for a in run.coord.rounds.accepted_log)
    _assert_same_globals(run.globals, want)
    assert sorted(run.globals) == list(range(1, 6))
    # the slow device got new tasks after the refusal and its later updates count
    assert any(a.device_id == "d2" for a in run.coord.rounds.accepted_log)


def test_coordinator_restarted_mid_buffer_loses_no_accepted_update(mosquitto, tmp_path):
    broker = mosquitto()
    cfg = _config(tmp_path, broker.url, buffer_size=3, concurrency=2, max_staleness=4, versions=4)
    deltas: dict[str, dict[str, np.ndarray]] = {}
    devices = [Device(broker.url, "d0", 0.02, deltas).start(), Device(broker.url, "d1", 0.1, deltas).start()]
    try:
        first = Run(cfg, stop_after=5)  # v1 from 3 updates, then 2 in the buffer of v2
        first.run()
        assert sorted(first.globals) == [1]
        buffered = [a for a in first.coord.rounds.accepted_log if a.version == 1]
        assert len(buffered) == 2
        journal = json.loads((cfg.state_dir / "async-round.json").read_text())
        assert journal["version"] == 1 and [t["task_id"] for t in journal["buffer"]] == [a.task_id for a in buffered]
        open_tasks = {t["device_id"]: t["base_version"] for t in journal["tasks"]}
        # a crash between saving v1 and emptying the journal: its buffer is in the saved global, not refolded
        crashed = tmp_path / "crashed-between-save-and-journal"
        shutil.copytree(cfg.state_dir, crashed)
        (crashed / "async-round.json").write_text(json.dumps({**journal, "version": 0}))
        other = Coordinator(cfg.model_copy(update={"state_dir": crashed}), store=FileStateStore(crashed))
        assert not other.rounds.accepted_log and len(other.rounds.buffer) == 0  # type: ignore[attr-defined]
        assert {d: c.base_version for d, c in other.rounds.outstanding.items()} == open_tasks  # type: ignore
        second = Run(cfg)
        # restored before anything else: the buffer refolded in order, the open tasks known with their bases
        restored = [a for a in second.coord.rounds.accepted_log if a.restored]
        assert [(a.task_id, a.staleness, a.weight) for a in restored] == \
               [(a.task_id, a.staleness, a.weight) for a in buffered]
        assert {d: c.base_version for d, c in second.coord.rounds.outstanding.items()} == open_tasks
        assert open_tasks  # the tasks whose answers the crash lost are sent again (same ids, same answers)
        second.run()
    finally:
        for d in devices:
            d.close()
    assert not any(d.errors for d in devices)
    assert second.coord.counters.restored == len(buffered)
    assert sorted(second.globals) == [2, 3, 4]
    # an uninterrupted run of the same arrivals: the reference over both coordinators' arrivals
    want, _, _ = reference_fedbuff(tiny_adapter(), first.arrivals + second.arrivals, deltas, buffer_size=3,
                                   max_staleness=4, weighting="sqrt")
    _assert_same_globals({**first.globals, **second.globals}, want)
    state = FileStateStore(cfg.state_dir).load()
    assert state is not None and state.global_version == 4
    assert not (cfg.state_dir / "async-round.json").exists()  # a finished run leaves no schedule behind


@pytest.mark.parametrize(("section", "needle"), [
    ({"mode": "zo", "zo": {}}, "the zo mode cannot run asynchronous rounds"),
    ({"aggregation": {"rule": "median"}}, "robust aggregation rules"),
])
def test_asynchronous_config_refuses_what_cannot_run_asynchronously(tmp_path, section, needle):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=needle):
        CoordinatorConfig(state_dir=tmp_path, asynchronous={"enabled": True}, **section)
    with pytest.raises(ValidationError, match="buffer_size"):
        CoordinatorConfig(state_dir=tmp_path, asynchronous={"enabled": True, "buffer_size": 0})
    cfg = CoordinatorConfig(state_dir=tmp_path, rounds=7, asynchronous={"enabled": True})
    assert cfg.async_versions == 7 and cfg.asynchronous.staleness_weighting == "sqrt"
    # from YAML: one line naming the key; the shipped example loads
    from fedmq.configfile import ConfigError, load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("asynchronous:\n  enabled: true\n  staleness_weighting: linear\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, CoordinatorConfig)
    assert "asynchronous.staleness_weighting" in str(err.value) and "\n" not in str(err.value)
    example = load_config(REPO / "configs/coordinator-async.yaml", CoordinatorConfig)
    assert example.asynchronous.enabled and example.async_versions == 50
    assert staleness_weight(3, "sqrt") == pytest.approx(0.5) and staleness_weight(3, "constant") == 1.0


def test_demo_async_runs_fedbuff_with_three_lora_agents_on_mosquitto(mosquitto, tmp_path):
    """`fedmq demo --async`: three real agent processes keep training; every version comes from two
    updates while the third device is still busy, and the held-out loss falls."""
    summary, work = tmp_path / "summary.json", tmp_path / "work"
    args = [sys.executable, "-m", "fedmq", "demo", "--model", "tiny-llama", "--method", "lora", "--async",
            "--agents", "3", "--rounds", "3", "--local-steps", "4", "--lr", "0.01", "--broker", mosquitto().url,
            "--workdir", str(work), "--summary", str(summary)]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    coord = yaml.safe_load((work / "coordinator.yaml").read_text())
    assert coord["asynchronous"] == {"enabled": True, "buffer_size": 2, "concurrency": 3, "max_staleness": 4}
    rounds = json.loads(summary.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2, 3]
    assert all(1 <= len(r["participants"]) <= 2 for r in rounds[1:])
    assert rounds[3]["eval_loss"] < rounds[0]["eval_loss"]
    # a healthy asynchronous run refuses nothing: updates still training at the end are not warnings
    assert [ln for ln in proc.stderr.splitlines() if " WARNING " in ln] == []
    refused = subprocess.run([sys.executable, "-m", "fedmq", "demo", "--method", "kd", "--async"], cwd=REPO,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "the kd method cannot run asynchronous rounds" in refused.stderr


def test_krso_agents_train_asynchronously_on_a_real_broker(mosquitto, tmp_path, tiny_llama):
    broker = mosquitto()
    data = tmp_path / "data"
    synthesize(data, num_devices=2, samples_per_device=24, eval_samples=8, seed=3)
    mode = {"krso": {"seed": 11, "num_seeds": 2, "rank": 4, "interval": 2, "checkpoint_every": 2}}
    coord_cfg = coordinator_config(
        tmp_path, broker.url, rounds=3, min_clients=2, fit={"local_steps": 2, "lr": 3e-3, "batch_size": 4,
                                                            "max_seq_len": 48},
        asynchronous={"enabled": True, "buffer_size": 2, "concurrency": 2, "max_staleness": 2}, **mode)
    agents = [spawn(["agent", "--config", str(agent_config(tmp_path, i, broker.url, data, model=tiny_llama,
                                                           method="krso"))], tmp_path / f"agent-{i}.log")
              for i in range(2)]
    coord = spawn(["coordinator", "--config", str(coord_cfg)], tmp_path / "coord.log")
    try:
        rc = coord.wait(timeout=240)
        deadline = time.monotonic() + 60  # every agent applies the ledger up to v3 for the final evaluation
        while not all(_krso_state(tmp_path, i).get("applied_round") == 3 for i in range(2)):
            assert time.monotonic() < deadline, [_krso_state(tmp_path, i) for i in range(2)]
            time.sleep(0.3)
    finally:
        stop_all([coord, *agents])
    log = (tmp_path / "coord.log").read_text()
    assert rc == 0, log[-3000:]
    assert "Traceback" not in log
    state = FileStateStore(tmp_path / "coordinator").load()
    assert state is not None and state.global_version == 3
    fits = [h for h in state.history if h.round > 0]
    assert [h.global_version for h in fits] == [1, 2, 3]
    assert all(len(h.participants) >= 1 and h.train_loss is not None and math.isfinite(h.train_loss) for h in fits)
    assert {p for h in fits for p in h.participants} == {"dev-0", "dev-1"}
    assert fits[-1].eval_loss is not None and math.isfinite(fits[-1].eval_loss)
    assert "version 3 from 2 buffered update(s)" in log
    assert len({_krso_state(tmp_path, i)["weights_digest"] for i in range(2)}) == 1


def _krso_state(tmp, i: int) -> dict:
    f = tmp / f"agent-{i}" / "krso-state.json"
    return json.loads(f.read_text()) if f.exists() else {}


def test_krso_versions_fold_stale_updates_from_older_draws_and_every_device_ends_on_the_same_weights(
        tiny_llama, tmp_path):
    """FedKRSO asynchronously, in process (the coordinator's and three agents' mode objects): v1 from
    two updates of round 1's draw; v2 from the third device's round-1 update (one version stale,
    weight 1/sqrt(2)) and a fresh round-2 update. v2's ledger entry holds both draws' seeds (``roots``),
    its B̄ is the plain staleness-weighted mean, and every device applying the ledger ends bitwise
    equal."""
    from broker_coordinator.buffered import Buffer, TaskRecord
    from fedmq_protocol.modes import krso as K
    from tests.test_krso import Device as KrsoDevice
    from tests.test_krso import _coordinator, _publish

    spec = K.KrsoSpec(seed=3, num_seeds=2, rank=4, interval=2, checkpoint_every=0)
    coord = _coordinator(tmp_path, spec)
    devs = [KrsoDevice(tiny_llama, f"dev-{i}", tmp_path) for i in range(3)]
    retained: dict[str, bytes] = {}

    def fold(version: int, arrivals: list[tuple[m.Update, int]]) -> K.KrsoLedgerRound:
        buf = Buffer(coord)
        for u, base in arrivals:
            buf.add(TaskRecord(u.task_id, u.device_id, u.round, base, 0, None), u, coord.validate_update(u),
                    staleness_weight(version - 1 - base, "sqrt"), 0)
        coord.aggregate_folded(version, version, buf.updates, buf.contributions, buf.running)
        _publish(coord, retained)
        return coord.ledger[-1]

    first = [d.fit(coord, 1, i) for i, d in enumerate(devs)]  # all three start on v0 (round 1's seeds)
    e1 = fold(1, [(first[0], 0), (first[1], 0)])
    assert e1.roots == ()
    for d in devs[:2]:
        d.receive(retained)
        d.reach(1)
    fresh = devs[0].fit(coord, 2, 0)  # on v1: round 2's seeds
    e2 = fold(2, [(first[2], 0), (fresh, 1)])
    r1, r2 = K.round_seed(spec.seed, 1), K.round_seed(spec.seed, 2)
    assert e2.round_seed == r2 and e2.roots == (r1,)
    # B̄ = (n_stale / sqrt(2) acc_stale + n_fresh acc_fresh) / (n_stale + n_fresh), per (seed, weight)
    stale_acc = first[2].tensors.decode_dense(max_elements=1 << 24)
    fresh_acc = fresh.tensors.decode_dense(max_elements=1 << 24)
    n_s, n_f = first[2].num_samples, fresh.num_samples
    got = e2.tensors.decode_dense(max_elements=1 << 24)
    assert set(got) == set(stale_acc) | set(fresh_acc)
    for name, g in got.items():
        want = (n_s / math.sqrt(2) * stale_acc.get(name, 0.0) + n_f * fresh_acc.get(name, 0.0)) / (n_s + n_f)
        np.testing.assert_allclose(g, np.asarray(want, dtype=np.float32), rtol=1e-6, atol=1e-7, err_msg=name)
    # the stale device returns to v0, then applies both rounds; all three agree bitwise
    for d in devs:
        d.receive(retained)
        d.reach(2)
    assert len({d.method.weights_digest() for d in devs}) == 1
    # the wire: a synchronous entry's bytes carry no roots key; this one's do and come back
    assert K.KrsoLedgerRound.from_msgpack(e2.to_msgpack()).roots == (r1,)
    assert b"roots" not in e1.to_msgpack()
