"""Helpers of the fault-injection tests (tests/test_reliability.py): a federation of processes on a
real Mosquitto, raw observers of the broker, figures read from the processes' logs, and the
independent FedAvg check.

Figures: with ``FEDMQ_RELIABILITY_OUT=path.json`` every scenario merges its figures into that file
under its name (``bench/reliability.py`` renders them as the table of docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge_agent.data import synthesize
from fedmq_protocol import messages as m
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport
from fedmq_protocol.transport.config import BrokerConfig
from tests.federation import (
    DENSE_DOWNLINK,
    DENSE_UPLINK,
    Capture,
    agent_config,
    coordinator_config,
    fedavg,
    spawn,
    stop_all,
)

FEDERATION = "test"
TOPICS = Topics("fedmq", FEDERATION)
# every update and global travels chunked: the broker refuses MQTT messages over 8 KiB
SIZE_LIMIT = 8 * 1024
CHUNKED = {"chunk_size": 4096}
FIT = {"local_steps": 2, "lr": 3e-3, "batch_size": 4, "max_seq_len": 32}



def wait_until(pred: Callable[[], object], timeout: float, what: str,
               procs: dict[str, subprocess.Popen] | None = None, poll: float = 0.05):
    """Poll ``pred`` until it is truthy; fail naming ``what`` (and any process that died)."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        for name, p in (procs or {}).items():
            if p.poll() is not None and p.returncode not in (0, -signal.SIGKILL):
                raise AssertionError(f"{name} exited with {p.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(poll)


@dataclass
class Observer:
    """Raw view of the broker: every update payload as sent (after reassembly), every status."""

    url: str
    updates: list[tuple[str, bytes, float]] = field(default_factory=list)  # (device, payload, time)
    statuses: list[m.DeviceStatus] = field(default_factory=list)
    chunks_seen: list[float] = field(default_factory=list)  # arrival of update chunk frames
    witnessed: set[bytes] = field(default_factory=set)  # tokens it published to itself and got back
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Observer:
        # a persistent session, like the coordinator's: across a broker restart (with persistence)
        # the broker keeps the chunks published while the observer reconnects, so it sees every
        # update the coordinator sees
        self.t = MqttTransport(BrokerConfig(url=self.url, chunk_size=CHUNKED["chunk_size"]),
                               f"observer-{time.time_ns()}", clean_start=False)

        def on_update(topic: str, payload: bytes) -> None:
            with self.lock:
                self.updates.append((TOPICS.device_id_from(topic), payload, time.time()))

        def on_chunk(topic: str, payload: bytes) -> None:
            with self.lock:
                self.chunks_seen.append(time.monotonic())

        def on_status(topic: str, payload: bytes) -> None:
            if payload:
                with self.lock:
                    self.statuses.append(m.DeviceStatus.from_json(payload))

        def on_witness(topic: str, payload: bytes) -> None:
            with self.lock:
                self.witnessed.add(payload)

        self.t.subscribe(TOPICS.all_device_updates, on_update, qos=1, framed=True)
        self.t.subscribe(f"{TOPICS.base}/devices/+/update/c/+", on_chunk, qos=1)
        self.t.subscribe(TOPICS.all_device_status, on_status, qos=1)
        self.t.subscribe(f"test-witness/{self.t.client_id}", on_witness, qos=1)
        self.t.connect(10)
        return self

    def drain(self, timeout: float) -> None:
        """Return once the broker has delivered everything it took before this call: it queues one
        subscriber's messages in order, so a token published now arrives after them."""
        token = uuid.uuid4().bytes
        self.t.publish(f"test-witness/{self.t.client_id}", token, qos=1, timeout=timeout)
        wait_until(lambda: token in self.witnessed, timeout, "the observer's own token back")

    def decoded(self) -> list[tuple[str, m.Update, bytes]]:
        with self.lock:
            items = list(self.updates)
        return [(d, m.Update.from_msgpack(p), p) for d, p, _ in items]

    def fits(self, round_no: int | None = None, device: str | None = None) -> list[m.Update]:
        return [u for _, u, _ in self.decoded()
                if u.kind == "fit" and (round_no is None or u.round == round_no)
                and (device is None or u.device_id == device)]

    def status_of(self, device: str) -> m.DeviceStatus | None:
        with self.lock:
            mine = [s for s in self.statuses if s.device_id == device]
        return mine[-1] if mine else None

    def close(self) -> None:
        self.t.close()


class Federation:
    """Agents and coordinator as separate processes on one broker, with captures and logs."""

    def __init__(self, tmp: Path, broker, *, agents: int, rounds: int, min_clients: int | None = None,
                 fit: dict | None = None, samples: int = 24, agent_extra: dict | None = None,
                 coordinator_broker: dict | None = None, **coordinator_extra) -> None:
        self.tmp, self.broker, self.n = tmp, broker, agents
        self.data = tmp / "data"
        synthesize(self.data, num_devices=agents, samples_per_device=samples, eval_samples=8, seed=3)
        self.capture = Capture(broker.url, TOPICS, chunk_size=CHUNKED["chunk_size"]).start()
        self.observer = Observer(broker.url).start()
        self.agents: dict[str, subprocess.Popen] = {}
        self.agent_logs: dict[str, list[Path]] = {}
        self.coord: subprocess.Popen | None = None
        self.coord_logs: list[Path] = []
        self._coord_args = dict(rounds=rounds, min_clients=min_clients or agents, fit=fit or FIT,
                                coordinator_broker=coordinator_broker, **coordinator_extra)
        self.reconfigure()
        # a hung (SIGSTOPped) agent must not be declared dead by the broker's keepalive meanwhile
        agent_broker = {**CHUNKED, "keepalive_s": 300}
        # dense fp32 both ways: check_globals_are_fedavg checks exact FedAvg of the updates sent
        self.agent_cfgs = {f"dev-{i}": agent_config(tmp, i, self.broker.url, self.data, broker=agent_broker,
                                                    **{"uplink": DENSE_UPLINK, **(agent_extra or {})})
                           for i in range(agents)}

    def reconfigure(self, **changes) -> None:
        """(Re)write the coordinator YAML; a coordinator started afterwards reads it."""
        args = {**self._coord_args, **changes}
        self._coord_args = args
        extra = {"evaluate": False, "round_deadline_s": 60, "wait_for_devices_s": 60, "downlink": DENSE_DOWNLINK,
                 **{k: v for k, v in args.items() if k not in ("rounds", "min_clients", "fit", "coordinator_broker")}}
        self.coord_cfg = coordinator_config(self.tmp, self.broker.url, rounds=args["rounds"],
                                            min_clients=args["min_clients"], fit=args["fit"],
                                            broker={**CHUNKED, **(args["coordinator_broker"] or {})}, **extra)

    # -- processes --------------------------------------------------------------------------
    def start_agent(self, dev: str) -> subprocess.Popen:
        logs = self.agent_logs.setdefault(dev, [])
        logs.append(self.tmp / f"{dev}.{len(logs)}.log")
        p = spawn(["agent", "--config", str(self.agent_cfgs[dev])], logs[-1])
        self.agents[dev] = p
        return p

    def start_agents(self, wait_idle: bool = True) -> None:
        for dev in self.agent_cfgs:
            self.start_agent(dev)
        if wait_idle:
            for dev in self.agent_cfgs:
                self.wait_status(dev, lambda s: s.online and s.state == "idle", 120)

    def start_coordinator(self) -> subprocess.Popen:
        self.coord_logs.append(self.tmp / f"coordinator.{len(self.coord_logs)}.log")
        self.coord = spawn(["coordinator", "--config", str(self.coord_cfg)], self.coord_logs[-1])
        return self.coord

    def restart_broker_witnessed(self, timeout: float = 60) -> None:
        """Restart the broker with every process of the federation held (SIGSTOP) from before the
        broker stops until the raw observer and the capture are subscribed again.

        A broker without persistence keeps nothing for the test's own clients across the restart.
        Held first, the devices send nothing more, and the observer is drained of what the broker
        already took (the coordinator may have had all of an update whose last chunks were still
        queued for the observer). Held until the observer is back, a device that re-sends its result
        reaches it too. Either way the independent FedAvg check would lack a copy the coordinator
        counted. The fault the federation meets is the same: retained messages, sessions and queued
        tasks are gone, and every connection drops."""
        witnesses = [self.observer.t, self.capture.transport]
        held = [p for p in self.procs().values() if p.poll() is None]
        for p in held:
            os.kill(p.pid, signal.SIGSTOP)
        try:
            time.sleep(0.2)  # what the held processes had written reaches the broker over loopback
            self.observer.drain(timeout)
            before = [w.connects for w in witnesses]
            self.broker.stop()
            self.broker.start()
            for w, n in zip(witnesses, before, strict=True):
                wait_until(lambda w=w, n=n: w.connects > n, timeout, f"{w.client_id} reconnected")
            # the broker handles one connection's packets in order: the token coming back means the
            # SUBSCRIBEs sent on the reconnect are in effect
            self.observer.drain(timeout)
            self.capture.transport.publish(f"test-witness/{self.capture.transport.client_id}", b"", qos=1,
                                           timeout=timeout)
        finally:
            for p in held:
                os.kill(p.pid, signal.SIGCONT)

    def procs(self) -> dict[str, subprocess.Popen]:
        out = dict(self.agents)
        if self.coord is not None:
            out["coordinator"] = self.coord
        return out

    def wait_status(self, dev: str, pred, timeout: float = 60) -> m.DeviceStatus:
        return wait_until(lambda: (s := self.observer.status_of(dev)) is not None and pred(s) and s,
                          timeout, f"status of {dev}", self.procs())

    def wait_coordinator(self, timeout: float = 300) -> None:
        assert self.coord is not None
        deadline = time.monotonic() + timeout
        while self.coord.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"coordinator still running after {timeout:.0f}s:\n{self.coord_log()[-3000:]}")
            time.sleep(0.1)
        assert self.coord.returncode == 0, self.coord_log()[-3000:]

    def coord_log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in self.coord_logs if p.exists())

    def agent_log(self, dev: str) -> str:
        return "".join(p.read_text(errors="replace") for p in self.agent_logs.get(dev, []) if p.exists())

    def state(self) -> dict:
        path = self.tmp / "coordinator" / "state.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def close(self) -> None:
        procs = list(self.agents.values()) + ([self.coord] if self.coord else [])
        for p in procs:  # a stopped (SIGSTOP) process must run to take SIGTERM
            if p.poll() is None:
                os.kill(p.pid, signal.SIGCONT)
        stop_all(procs)
        self.capture.close()
        self.observer.close()

    # -- figures ----------------------------------------------------------------------------
    def coordinator_figures(self) -> dict:
        """Counters summed over every coordinator process (the last 'figures' line of each log)."""
        total: dict = {}
        for path in self.coord_logs:
            lines = [ln for ln in path.read_text(errors="replace").splitlines() if " figures {" in ln]
            if not lines:
                continue
            fig = json.loads(lines[-1].split(" figures ", 1)[1])
            for k, v in fig.items():
                if k in ("rss_mb", "round_completed"):
                    total[k] = v
                elif isinstance(v, int):
                    total[k] = total.get(k, 0) + v
        return total

    def refused_late(self) -> set[tuple[str, str]]:
        """(device, task id) of updates the coordinator refused because their task was closed."""
        pat = re.compile(r"rejected update on \S+/devices/([^/]+)/update: update for task '([^']+)' .* is not open")
        return {(d, t) for d, t in pat.findall(self.coord_log())}

    def check_globals_are_fedavg(self, rounds: int) -> dict:
        """Every global v = FedAvg over the updates the devices sent for round v, each counted once;
        an update sent and neither aggregated nor refused as late counts as lost. Returns the
        update figures of the run."""
        state = self.state()
        assert state["round_completed"] == rounds, state.get("round_completed")
        history = {h["round"]: h for h in state["history"]}
        fits = [u for _, u, _ in self.observer.decoded() if u.kind == "fit"]
        # every copy of one device's result for one task is the same bytes (resends are idempotent)
        by_task: dict[tuple[str, str], list[m.Update]] = {}
        for u in fits:
            by_task.setdefault((u.device_id, u.task_id), []).append(u)
        for key, copies in by_task.items():
            assert len({c.to_msgpack() for c in copies}) == 1, f"{key}: different updates for one task"
        late = self.refused_late()
        aggregated = lost = 0
        for v in range(1, rounds + 1):
            participants = history[v]["participants"]
            # what each device sent for round v: one task, or (after a retry, whose task may also be
            # answered late under the earlier attempt) the one task of it not refused as late
            sent: dict[str, list[m.Update]] = {}
            for (d, _), copies in by_task.items():
                if copies[0].round == v:
                    sent.setdefault(d, []).append(copies[0])
            used = []
            for d in participants:
                cands = sent.get(d, [])
                if len(cands) > 1:
                    cands = [u for u in cands if (d, u.task_id) not in late]
                assert len(cands) == 1, (v, d, [u.task_id for u in sent.get(d, [])])
                used.append(cands[0])
            lost += sum(1 for d, us in sent.items() if d not in participants
                        and any((d, u.task_id) not in late for u in us))
            assert history[v]["num_samples"] == sum(u.num_samples for u in used)
            expected = fedavg(self.capture.weights[v - 1], used)
            got = self.capture.weights[v]
            assert set(got) == set(expected)
            for name, arr in expected.items():
                np.testing.assert_allclose(got[name], arr, rtol=0, atol=1e-6, err_msg=f"v{v} {name}")
            aggregated += len(participants)
        return {
            "updates_sent": len(by_task),
            "update_messages_seen": len(fits),
            "aggregated": aggregated,
            "lost": lost,
            "counted_twice": 0,  # proven by the FedAvg equality and num_samples above
            "refused_late": len(late),
        }


def record(name: str, figures: dict) -> None:
    """Merge ``figures`` of scenario ``name`` into $FEDMQ_RELIABILITY_OUT (when set)."""
    out = os.environ.get("FEDMQ_RELIABILITY_OUT")
    if not out:
        return
    path = Path(out)
    data = json.loads(path.read_text()) if path.exists() else {}
    data[name] = figures
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
