"""A hostile or odd network must not stall a federation.

- On an open Mosquitto (anonymous, no ACL) a client subscribed to ``#`` floods the broker, for the
  whole run, with unchanged replays of every payload it observes and with mutations of them
  (truncations, bit flips, huge msgpack lengths, NaN, wrong types, random bytes) at >= 200
  messages/s: every round completes, held-out loss falls, every refusal is counted, and no agent
  acts on a task the coordinator did not send or on one it sent before. Once with the demo's
  defaults (sealed but unsigned coordinator messages), once with signatures required both ways.
- A coordinator killed mid-round accepts, once restarted, the updates the broker held for it.
- RabbitMQ's MQTT plugin (3.1.1 only, retained messages to exact-topic subscriptions only).
"""

from __future__ import annotations

import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from edge_agent.data import synthesize
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.seal import SealOpener
from fedmq_protocol.signing import generate_keypair, load_public_key
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport
from fedmq_protocol.transport.config import BrokerConfig
from tests.federation import agent_config, coordinator_config, spawn, stop_all, wait_for_status
from tests.hostile import HostileClient
from tests.mosquitto import free_port
from tests.reliability import Federation, record, wait_until

TOPICS = Topics("fedmq", "test")
FIT = {"local_steps": 3, "lr": 3e-3, "batch_size": 4, "max_seq_len": 32}
RATE = 250.0  # messages/s the hostile client aims at; >= 200 is asserted on what it achieved


class TelemetryWatch:
    """The latest telemetry of each device (its ``rejected`` counters)."""

    def __init__(self, url: str) -> None:
        self.latest: dict[str, m.Telemetry] = {}
        self.t = MqttTransport(BrokerConfig(url=url), f"telemetry-{time.time_ns()}", clean_start=True)

        def on(topic: str, payload: bytes) -> None:
            try:
                tel = m.Telemetry.from_json(payload)
                if topic == TOPICS.device_telemetry(tel.device_id):
                    self.latest[tel.device_id] = tel
            except ProtocolError:
                return  # the hostile client's junk

        self.t.subscribe(TOPICS.all_device_telemetry, on, qos=0)
        self.t.connect(10)


def _figures(log: str) -> dict:
    lines = [ln for ln in log.splitlines() if " figures {" in ln]
    return json.loads(lines[-1].split(" figures ", 1)[1]) if lines else {}


def _real_task_ids(payloads: list[bytes], public_key) -> set[str]:
    """Task ids of the payloads the coordinator sealed (checked as an agent checks them)."""
    out = set()
    for p in payloads:
        try:
            task_topic = TOPICS.device_task(m.Task.from_msgpack(_body(p)).device_id)
            opened = SealOpener("test", public_key, require_signatures=public_key is not None).open(task_topic, p)
        except ProtocolError:
            continue
        if opened is not None and opened.counter is not None:
            out.add(m.Task.from_msgpack(opened.body).task_id)
    return out


def _body(payload: bytes) -> bytes:
    from fedmq_protocol.seal import body_of

    return body_of(payload)


def _run_under_flood(mosquitto, tmp_path: Path, *, signed: bool, rate: float | None = RATE, agents: int = 2,
                     rounds: int = 2) -> dict:
    broker = mosquitto()
    data = tmp_path / "data"
    synthesize(data, num_devices=agents, samples_per_device=24, eval_samples=8, seed=3)
    agent_extra: dict = {"status_interval_s": 2.0}
    coord_extra: dict = {"status_max_age_s": 20, "retained_guard_s": 2.0, "round_deadline_s": 120,
                         "eval_deadline_s": 120, "wait_for_devices_s": 120}
    coord_pub = None
    if signed:
        pem, coord_pub_b64 = generate_keypair()
        (tmp_path / "coordinator.key").write_bytes(pem)
        coord_extra.update(coordinator_key=str(tmp_path / "coordinator.key"), require_signatures=True, device_keys={})
        agent_extra.update(coordinator_public_key=coord_pub_b64, require_coordinator_signatures=True)
        coord_pub = load_public_key(coord_pub_b64)
    configs = []
    for i in range(agents):
        extra = dict(agent_extra)
        if signed:
            pem, pub = generate_keypair()
            (tmp_path / f"dev-{i}.key").write_bytes(pem)
            extra["signing_key"] = str(tmp_path / f"dev-{i}.key")
            coord_extra["device_keys"][f"dev-{i}"] = pub
        configs.append(agent_config(tmp_path, i, broker.url, data, **extra))
    hostile = HostileClient("127.0.0.1", broker.port, rate=rate, seed=7).start() if rate else None
    watch = TelemetryWatch(broker.url)
    procs = [spawn(["agent", "--config", str(c)], tmp_path / f"a{i}.log") for i, c in enumerate(configs)]
    t0 = time.monotonic()
    try:
        cfg = coordinator_config(tmp_path, broker.url, rounds=rounds, min_clients=agents, fit=FIT, **coord_extra)
        coord = spawn(["coordinator", "--config", str(cfg)], tmp_path / "coord.log")
        rc = coord.wait(timeout=400)
        wall_s = time.monotonic() - t0
        time.sleep(1.5)  # the agents' last telemetry
    finally:
        if hostile is not None:
            hostile.stop()
        stop_all(procs + ([coord] if "coord" in locals() else []))
        watch.t.close()
    coord_log = (tmp_path / "coord.log").read_text(errors="replace")
    assert rc == 0, coord_log[-3000:]
    state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
    history = state["history"]
    assert [h["round"] for h in history] == list(range(rounds + 1))  # every round completed
    assert history[-1]["eval_loss"] < history[0]["eval_loss"], [h["eval_loss"] for h in history]
    agent_logs = {f"dev-{i}": (tmp_path / f"a{i}.log").read_text(errors="replace") for i in range(agents)}
    acted = {d: re.findall(r"sent \w+ result for (\S+) \(", log) for d, log in agent_logs.items()}
    figures = _figures(coord_log)
    out = {"wall_s": round(wall_s, 1), "rounds": rounds, "agents": agents,
           "round_s": [round(h["duration_s"], 1) for h in history[1:]],
           "eval_loss": [round(h["eval_loss"], 3) for h in history],
           "acted": acted, "figures": figures, "telemetry": watch.latest, "hostile": hostile,
           "coord_pub": coord_pub}
    return out


def _check_flood(run: dict, *, signed: bool) -> dict:
    hostile: HostileClient = run["hostile"]
    figures, acted = run["figures"], run["acted"]
    rate = hostile.achieved_rate
    assert rate >= 200, f"the hostile client sent {hostile.sent} messages at {rate:.0f}/s"
    # every payload the federation published was replayed unchanged (but those of the last seconds)
    assert hostile.replayed > 0 and not hostile.not_replayed(older_than_s=5.0)
    # no agent acted on a task the coordinator did not send, nor twice on one it sent
    real = _real_task_ids(hostile.tasks, run["coord_pub"])
    for dev, ids in acted.items():
        assert ids and set(ids) <= real, (dev, sorted(set(ids) - real))
        assert max(collections.Counter(ids).values()) == 1, (dev, ids)
    # every refusal counted: per source topic and reason, and in the totals
    refused = figures["updates_rejected"] + figures["status_rejected"]
    assert refused > 0 and figures["rejected_total"] == refused
    assert sum(figures["rejected_by_topic"].values()) <= refused and figures["rejected_by_reason"]
    assert figures["retained_forged"] > 0 and figures["retained_restored"] > 0
    for dev, tel in run["telemetry"].items():  # each agent refused junk on its topics and counted it
        assert sum(tel.rejected.values()) > 0, (dev, tel.rejected)
    sent_results = sum(len(ids) for ids in acted.values())
    # the coordinator accepted results only of what the agents sent (each once)
    if signed:
        assert figures["updates_accepted"] == sent_results, (figures["updates_accepted"], sent_results)
    else:
        assert figures["updates_accepted"] <= sent_results
    return {
        "hostile_rate_msg_s": round(rate, 1), "hostile_sent": hostile.sent, "hostile_replayed": hostile.replayed,
        "hostile_mutated": hostile.mutated, "observed_payloads": hostile.observed_payloads,
        "rounds_completed": run["rounds"], "round_s": run["round_s"], "eval_loss": run["eval_loss"],
        "coordinator_refused": refused, "retained_forged_seen": figures["retained_forged"],
        "retained_restored": figures["retained_restored"], "dropped_unread": figures["dropped"],
        "agent_refused": {d: sum(t.rejected.values()) for d, t in run["telemetry"].items()},
        "forged_accepted": sent_results - figures["updates_accepted"] if signed else None,
        "tasks_acted_on_not_sent": 0, "wall_s": run["wall_s"],
    }


def test_hostile_client_floods_replays_and_mutations_and_every_round_completes(mosquitto, tmp_path):
    run = _run_under_flood(mosquitto, tmp_path, signed=False)
    record("hostile_flood_unsigned", _check_flood(run, signed=False))


def test_hostile_client_with_signatures_required_gets_nothing_accepted(mosquitto, tmp_path):
    run = _run_under_flood(mosquitto, tmp_path, signed=True)
    figures = _check_flood(run, signed=True)
    assert figures["forged_accepted"] == 0
    record("hostile_flood_signed", figures)


# ---------------------------------------------------------------------------------------------
def test_restarted_coordinator_accepts_updates_the_broker_held_for_it(mosquitto, tmp_path):
    """SIGKILL the coordinator right after round 1's tasks went out; the devices' updates reach the
    broker while it is down and wait in its session. The restarted coordinator restores the round
    from its journal, then accepts them: no device sends its update again."""
    broker = mosquitto()
    fed = Federation(tmp_path, broker, agents=2, rounds=1)
    try:
        fed.start_agents()
        fed.start_coordinator()

        def round_open() -> bool:
            try:
                rec = json.loads((tmp_path / "coordinator" / "open-round.json").read_text())
            except (FileNotFoundError, ValueError):
                return False
            return rec.get("round") == 1 and not list((tmp_path / "coordinator").glob("open-*.msgpack"))

        wait_until(round_open, 120, "round 1's tasks", fed.procs(), poll=0.01)
        fed.coord.send_signal(signal.SIGKILL)
        fed.coord.wait(10)
        wait_until(lambda: len({u.device_id for u in fed.observer.fits(1)}) == 2, 120,
                   "both round-1 updates on the broker", fed.procs())
        fed.start_coordinator()
        fed.wait_coordinator(120)
    finally:
        fed.close()
    log = fed.coord_log()
    figures = _figures(fed.coord_logs[-1].read_text())
    assert figures["queued_after_restart"] == 2, log[-3000:]
    assert figures["late"] == 0 and figures["updates_rejected"] == 0
    assert "2 update(s) the broker held for this coordinator accepted" in log
    for d in ("dev-0", "dev-1"):
        assert len(fed.observer.fits(1, d)) == 1, f"{d} had to send its update again"
    assert fed.state()["round_completed"] == 1
    record("coordinator_restart_queued", {"queued_updates_accepted": figures["queued_after_restart"],
                                          "updates_sent_again": 0, "late_refused": figures["late"]})


# ---------------------------------------------------------------------------------------------
def _rabbitmq_server() -> str | None:
    # the server script itself: /usr/sbin's wrapper would switch to the rabbitmq user, who cannot
    # read the test's private directory
    for path in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def _install_rabbitmq() -> str | None:
    """apt-get install rabbitmq-server (quiet), when this process may (root, apt-get there)."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return None
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "install", "-y", "-qq", "rabbitmq-server"], env=env, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return _rabbitmq_server()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def rabbitmq(tmp_path_factory):
    """A RabbitMQ node of its own (MQTT plugin), on loopback-only free ports, its own config and data."""
    exe = _rabbitmq_server() or _install_rabbitmq()
    if exe is None:
        pytest.skip("rabbitmq-server is not installed and cannot be installed here (apt-get as root)")
    d = tmp_path_factory.mktemp("rabbitmq")
    amqp, mqtt_port, dist, epmd = free_port(), free_port(), free_port(), free_port()
    (d / "rabbitmq.conf").write_text(
        f"listeners.tcp.1 = 127.0.0.1:{amqp}\n"
        f"mqtt.listeners.tcp.1 = 127.0.0.1:{mqtt_port}\n"
        "mqtt.allow_anonymous = true\n"
        "loopback_users = none\n"
        "log.console = false\n")
    (d / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
    for sub in ("mnesia", "log"):
        (d / sub).mkdir()
    env = dict(os.environ, HOME=str(d), RABBITMQ_NODENAME=f"fedmq{mqtt_port}@localhost",
               RABBITMQ_MNESIA_BASE=str(d / "mnesia"), RABBITMQ_LOG_BASE=str(d / "log"),
               RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"), RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
               RABBITMQ_PID_FILE=str(d / "rabbit.pid"), RABBITMQ_FEATURE_FLAGS_FILE=str(d / "feature_flags"),
               ERL_CRASH_DUMP=str(d / "erl_crash.dump"), RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
               RABBITMQ_NODE_PORT=str(amqp), RABBITMQ_DIST_PORT=str(dist), ERL_EPMD_ADDRESS="127.0.0.1",
               ERL_EPMD_PORT=str(epmd),
               RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}")
    log = open(d / "server.log", "w")  # noqa: SIM115 - open for the server's lifetime, closed below
    proc = subprocess.Popen([exe], env=env, cwd=d, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _port_open(mqtt_port):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"rabbitmq did not open its MQTT port: {(d / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"mqtt://127.0.0.1:{mqtt_port}"
    finally:
        with_pg = os.getpgid(proc.pid) if proc.poll() is None else None
        if with_pg is not None:
            os.killpg(with_pg, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(with_pg, signal.SIGKILL)
                proc.wait()
        epmd_exe = shutil.which("epmd") or next(iter(sorted(Path("/usr/lib/erlang").glob("erts-*/bin/epmd"))), None)
        if epmd_exe:  # the node's own epmd (on its own port) outlives the node
            subprocess.run([str(epmd_exe), "-port", str(epmd), "-kill"], env=env, timeout=10,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        log.close()


def test_rabbitmq_federation_and_a_late_device_reaches_the_same_global(rabbitmq, tmp_path, caplog):
    """RabbitMQ 3.10 speaks MQTT 3.1.1 only and delivers retained messages to exact-topic
    subscriptions only: 2 agents train 2 rounds, then a third joins late and reaches the global
    the others hold (exact chunk topics from the manifest, exact next-difference topics)."""
    data = tmp_path / "data"
    synthesize(data, num_devices=3, samples_per_device=24, eval_samples=8, seed=5)
    broker = {"mqtt_version": "3.1.1", "chunk_size": 16384}
    procs = [spawn(["agent", "--config", str(agent_config(tmp_path, i, rabbitmq, data, broker=broker))],
                   tmp_path / f"a{i}.log") for i in range(2)]
    try:
        cfg = coordinator_config(tmp_path, rabbitmq, rounds=2, min_clients=2, fit=FIT, broker=broker,
                                 downlink={"snapshot_every": 4})  # v1, v2 are differences after snapshot v0
        rc = spawn(["coordinator", "--config", str(cfg)], tmp_path / "coord.log").wait(timeout=300)
        assert rc == 0, (tmp_path / "coord.log").read_text()[-3000:]
        state = json.loads((tmp_path / "coordinator" / "state.json").read_text())
        assert state["round_completed"] == 2 and state["global_version"] == 2
        late = agent_config(tmp_path, 2, rabbitmq, data, broker=broker)
        procs.append(spawn(["agent", "--config", str(late)], tmp_path / "a2.log"))
        # (this watcher asks for MQTT 5: refused by RabbitMQ, it retries with 3.1.1)
        status = wait_for_status(rabbitmq, "dev-2", lambda s: s.applied_version == 2, timeout=120)
        assert status.online
        others = [wait_for_status(rabbitmq, f"dev-{i}", lambda s: s.online, timeout=30) for i in range(2)]
        assert {s.applied_version for s in others} == {2}
    finally:
        stop_all(procs)
    late_log = (tmp_path / "a2.log").read_text()
    assert "applied global version 2" in late_log
    assert "refused MQTT 5" in caplog.text and "retrying with MQTT 3.1.1" in caplog.text  # the watcher
