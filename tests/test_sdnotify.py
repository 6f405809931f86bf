"""systemd notification: the socket protocol, the liveness-gated watchdog, and a real agent process
talking to a NOTIFY_SOCKET the way it does under ``Type=notify`` + ``WatchdogSec=``."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time

from edge_agent.data import synthesize
from fedmq.sdnotify import Notifier, Watchdog
from fedmq_protocol.transport import Published
from tests.federation import agent_config, coordinator_config, spawn, stop_all, wait_for_status


class NotifySocket:
    """A unix datagram socket standing in for systemd's notify socket; records every datagram."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address.replace("@", "\0", 1) if address.startswith("@") else address)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def lines(self) -> list[str]:
        return [line for _, msg in list(self.messages) for line in msg.split("\n")]

    def wait_for(self, line: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.lines():
            assert time.monotonic() < deadline, f"{line!r} never arrived; got {self.lines()[-10:]}"
            time.sleep(0.05)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def test_notifier_is_a_noop_outside_systemd():
    n = Notifier(environ={})
    assert not n.enabled and n.watchdog_s is None
    assert n.ready() is False and n.watchdog() is False


def test_notifier_sends_to_path_and_abstract_sockets(tmp_path):
    path = str(tmp_path / "notify")
    abstract = f"@fedmq-test-{os.getpid()}-{time.time_ns()}"
    for address in (path, abstract):
        server = NotifySocket(address)
        try:
            n = Notifier(environ={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "4000000"})
            assert n.watchdog_s == 4.0
            assert n.ready("up") and n.watchdog() and n.stopping()
            server.wait_for("STOPPING=1", 2)
            assert [msg for _, msg in server.messages] == ["READY=1\nSTATUS=up", "WATCHDOG=1", "STOPPING=1"]
            n.close()
        finally:
            server.close()


def test_watchdog_usec_for_another_pid_is_ignored():
    n = Notifier(environ={"NOTIFY_SOCKET": "/nonexistent", "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"})
    assert n.watchdog_s is None
    assert Notifier(environ={"WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid())}).watchdog_s == 5.0


def test_watchdog_pings_only_while_the_work_loop_is_alive(tmp_path):
    server = NotifySocket(str(tmp_path / "notify"))
    now = [100.0]
    alive = [100.0]
    state = ["idle"]
    n = Notifier(environ={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "10000000"})
    dog = Watchdog(n, lambda: alive[0], lambda: state[0], clock=lambda: now[0])
    try:
        assert dog.tick()  # fresh
        now[0] = 109.0  # 9 s without progress, interval 10 s: still alive
        state[0] = "training"
        assert dog.tick()
        now[0] = 111.0  # 11 s: hung, systemd must be allowed to kill it
        assert not dog.tick() and dog.withheld == 1
        alive[0] = 111.0  # a training step reported progress
        assert dog.tick()
        # a phase that cannot report progress (model loading) may be granted longer
        state[0] = "loading"
        dog.allowance = lambda: 60.0 if state[0] == "loading" else 0.0
        now[0] = 150.0
        assert dog.tick()
        server.wait_for("STATUS=loading", 2)
        time.sleep(0.1)
        assert server.lines() == [
            "STATUS=idle", "WATCHDOG=1", "STATUS=training", "WATCHDOG=1", "WATCHDOG=1",
            "STATUS=loading", "WATCHDOG=1",
        ]
    finally:
        server.close()


def test_agent_process_sends_ready_watchdog_during_training_and_stopping_on_sigterm(mosquitto, tmp_path):
    broker = mosquitto()
    data = tmp_path / "data"
    synthesize(data, num_devices=1, samples_per_device=40, eval_samples=10, seed=3)
    notify = NotifySocket(str(tmp_path / "notify"))
    interval = 3.0
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": str(int(interval * 1e6))}
    agent = spawn(["agent", "--config", str(agent_config(tmp_path, 0, broker.url, data))], tmp_path / "a.log", env=env)
    procs = [agent]
    try:
        notify.wait_for("READY=1", 120)
        ready_at = next(t for t, msg in notify.messages if "READY=1" in msg)
        cfg = coordinator_config(tmp_path, broker.url, rounds=1, min_clients=1, evaluate=False,
                                 fit={"local_steps": 300, "lr": 3e-3, "batch_size": 4, "max_seq_len": 64})
        coord = spawn(["coordinator", "--config", str(cfg)], tmp_path / "c.log")
        procs.append(coord)
        assert coord.wait(timeout=300) == 0, (tmp_path / "c.log").read_text()[-2000:]
        assert "STATUS=training, global v0" in notify.lines(), notify.lines()
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=60) == 0, (tmp_path / "a.log").read_text()[-2000:]
        stopped_at = time.monotonic()
    finally:
        stop_all(procs)
        notify.close()
    assert "STOPPING=1" in notify.lines()
    # The watchdog was fed all along, also while training: no gap reached the interval.
    pings = [t for t, msg in notify.messages if msg == "WATCHDOG=1"]
    assert len(pings) >= 3
    stamps = [ready_at, *pings]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < interval, gaps
    assert stopped_at - pings[-1] < interval
    # The clean shutdown left the retained death on the broker.
    status = wait_for_status(broker.url, "dev-0", lambda s: True, timeout=10)
    assert status.online is False and status.state == "offline"


class _RecordingTransport:
    """Stands in for the broker connection of an in-process agent; keeps what is published."""

    connected = True
    bytes_sent = bytes_received = 0

    def __init__(self) -> None:
        self.on_connect: list = []
        self.on_disconnect: list = []
        self.published: list[tuple[str, bytes]] = []

    def publish(self, topic, payload, qos=0, retain=False, framed=False, timeout=None) -> Published:
        self.published.append((topic, bytes(payload)))
        return Published(len(payload), 0)

    def subscribe(self, *a, **k) -> None:
        pass

    def connect(self, *a, **k) -> None:
        pass

    def close(self) -> None:
        self.connected = False


def test_a_zeroth_order_fit_longer_than_the_watchdog_interval_keeps_the_agent_alive(tmp_path, tiny_llama, monkeypatch):
    """Every training step refreshes ``alive_at``, in a zo federation too: a fit that lasts several
    watchdog intervals (slowed steps) is never taken for a hung process (cf. the LoRA agent process
    above, fed through a whole 300-step round)."""
    from edge_agent.agent import create_agent
    from edge_agent.config import AgentConfig
    from edge_agent.methods.zo import ZoMethod
    from fedmq_protocol import messages as m
    from fedmq_protocol.codec import encode
    from fedmq_protocol.modes.zo import ZoTask

    synthesize(tmp_path / "data", num_devices=1, samples_per_device=12, eval_samples=2, seed=1)
    cfg = AgentConfig(device_id="dev-0", federation="test", model=tiny_llama, method="zo", device="cpu",
                      data={"train": str(tmp_path / "data" / "device_0.jsonl")}, state_dir=str(tmp_path / "state"),
                      training={"torch_threads": 1})
    agent = create_agent(cfg, transport=_RecordingTransport())
    agent.start()
    interval, step_s, steps = 0.6, 0.15, 10
    dog = Watchdog(Notifier(environ={"WATCHDOG_USEC": str(int(interval * 1e6))}), lambda: agent.alive_at,
                   allowance=lambda: 120.0 if agent.state == "loading" else 0.0)
    # global v0 (the base checkpoint, no ledger round yet), applied while idle as the run loop does
    v0 = m.GlobalModel(version=0, round=0, adapter=m.AdapterSpec(), tensors=encode({}))
    agent._events.put(("global", agent.topics.global_model, v0.to_msgpack(), time.time()))
    agent._pump(0)
    agent._apply_pending_global()
    assert agent.global_version == 0

    real_step = ZoMethod.step
    ages: list[float] = []

    def slow_step(self, *args, **kwargs):
        ages.append(time.monotonic() - agent.alive_at)
        assert dog.tick(), f"watchdog withheld at step {len(ages)}: no liveness for {ages[-1]:.2f}s"
        time.sleep(step_s)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(ZoMethod, "step", slow_step)
    task = m.Task(kind="fit", task_id="r1-fit-v0-a0", round=1, device_id="dev-0", global_version=0, deadline_s=60,
                  adapter=m.AdapterSpec(), fit=m.FitConfig(local_steps=steps, batch_size=2, max_seq_len=32, seed=3),
                  payload=ZoTask(seed=5, num_seeds=8, eps=1e-2, lr=1e-3, target="full"))
    started = time.monotonic()
    agent._events.put(("task", agent.topics.device_task("dev-0"), task.to_msgpack(), time.time()))
    agent._pump(0)
    took = time.monotonic() - started
    updates = [p for t, p in agent.transport.published if t == agent.topics.device_update("dev-0")]
    agent.close()
    assert len(ages) == steps and took > 2 * interval  # the fit outlasted the watchdog interval
    assert len(updates) == 1 and m.Update.from_msgpack(updates[0]).payload is not None
    assert max(ages) < interval and dog.withheld == 0, ages
    assert agent.alive_at > started + (steps - 1) * step_s  # refreshed by the last steps
