"""``fedmq watch``: a live view of a federation built only from its JSON broker topics.

It subscribes to the device status (retained), device telemetry, coordinator status (retained) and
round summaries, validates each message with the protocol models, and renders the fleet with rich.
``--once`` prints one snapshot of what the broker holds; ``--record FILE`` appends every valid
message as a JSON line (``{"ts", "topic", "payload"}``) that ``fedmq report --log FILE`` reads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.topics import Topics

log = logging.getLogger("fedmq.watch")

FINISHED_STATES = ("finished", "stopped")


def human_bytes(n: float | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


@dataclass
class FleetView:
    """The fleet as the broker tells it; fed one message at a time (thread-safe)."""

    topics: Topics
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)
    coordinator: dict[str, Any] | None = None
    rounds: dict[int, dict[str, Any]] = field(default_factory=dict)
    invalid: int = 0
    messages: int = 0
    last_message_at: float = 0.0
    finished_seen: bool = False  # latched: the coordinator's "finished" is followed at once by "offline"
    lock: threading.Lock = field(default_factory=threading.Lock)

    def feed(self, topic: str, payload: bytes) -> dict[str, Any] | None:
        """Validate and apply one message; returns its JSON object, or None if ignored/invalid."""
        if not payload:
            return None  # a cleared retained message
        base = self.topics.base
        try:
            if topic == self.topics.coordinator_status:
                msg: m.Message = m.CoordinatorStatus.from_json(payload)
            elif topic == self.topics.rounds:
                msg = m.RoundSummary.from_json(payload)
            elif topic.startswith(f"{base}/devices/") and topic.endswith(("/status", "/telemetry")):
                device_id = self.topics.device_id_from(topic)
                cls = m.DeviceStatus if topic.endswith("/status") else m.Telemetry
                msg = cls.from_json(payload)
                if msg.device_id != device_id:
                    raise ProtocolError(f"message names device {msg.device_id!r} but came on {topic!r}")
            else:
                return None
        except ProtocolError as exc:
            with self.lock:
                self.invalid += 1
            log.warning("ignored %s: %s", topic, exc)
            return None
        obj = json.loads(msg.to_json())
        with self.lock:
            self.messages += 1
            self.last_message_at = time.monotonic()
            if isinstance(msg, m.CoordinatorStatus):
                self.coordinator = obj
                self.finished_seen |= msg.state in FINISHED_STATES
            elif isinstance(msg, m.RoundSummary):
                self.rounds[msg.round] = obj
            elif isinstance(msg, m.DeviceStatus):
                dev = self.devices.setdefault(msg.device_id, {})
                if msg.order >= tuple(dev.get("order", (-1,))):  # a stale Will or a replay never wins
                    dev["status"], dev["order"] = obj, list(msg.order)
            elif isinstance(msg, m.Telemetry):
                self.devices.setdefault(msg.device_id, {})["telemetry"] = obj
        return obj

    @property
    def finished(self) -> bool:
        with self.lock:
            return self.finished_seen

    def snapshot(self) -> dict[str, Any]:
        """A plain-data copy (also what ``--json`` prints)."""
        with self.lock:
            return json.loads(json.dumps({
                "federation": self.topics.base,
                "coordinator": self.coordinator,
                "devices": self.devices,
                "rounds": [self.rounds[r] for r in sorted(self.rounds)],
            }))

    # ------------------------------------------------------------------ rendering
    def render(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        snap = self.snapshot()
        now = time.time()
        c = snap["coordinator"]
        if c:
            head = (f"coordinator {'online' if c.get('online') else 'OFFLINE'} · {c.get('state', '?')} · "
                    f"round {c.get('round', '?')}/{c.get('rounds_total', '?')} · "
                    f"global v{c.get('global_version', '-')}")
        else:
            head = "coordinator: no status on the broker"
        online = sum(1 for d in snap["devices"].values() if d.get("status", {}).get("online"))
        title = Text(f"fedmq {snap['federation']} · {online}/{len(snap['devices'])} devices online · {head}",
                     style="bold")

        dev = Table(title="devices", expand=False, title_justify="left")
        for col in ("device", "online", "state", "method", "model", "global", "round", "step", "loss",
                    "tok/s", "RSS", "RAM free", "GPU free", "sent", "recv", "seen"):
            dev.add_column(col, justify="left" if col in ("device", "state", "method", "model") else "right")
        for device_id in sorted(snap["devices"]):
            d = snap["devices"][device_id]
            st, tm = d.get("status", {}), d.get("telemetry", {})
            res = tm.get("resources") or st.get("resources") or {}
            gpus = res.get("gpus") or []
            steps = f"{tm['step']}/{tm.get('steps_total', '?')}" if tm.get("step") is not None else ""
            seen = max(st.get("ts", 0), tm.get("ts", 0))
            dev.add_row(
                device_id,
                Text("yes", style="green") if st.get("online") else Text("no", style="red"),
                tm.get("state") if st.get("online") and tm.get("ts", 0) >= st.get("ts", 0) else st.get("state", ""),
                _method_cell(st, tm),
                str(st.get("model") or ""),
                _fmt(st.get("applied_version", tm.get("applied_version"))),
                _fmt(tm.get("round")),
                steps,
                _fmt(tm.get("loss"), "{:.4f}"),
                _fmt(tm.get("tokens_per_s"), "{:.0f}"),
                _fmt(res.get("process_rss_mb"), "{:.0f} MB"),
                _fmt(res.get("ram_available_mb"), "{:.0f} MB"),
                " ".join(f"{g['free_mb']:.0f} MB" for g in gpus) or "-",
                human_bytes(tm.get("bytes_sent")),
                human_bytes(tm.get("bytes_received")),
                f"{max(0, now - seen):.0f}s ago" if seen else "",
            )

        rnd = Table(title="rounds", expand=False, title_justify="left")
        for col in ("round", "global", "participants", "stragglers", "train loss", "eval loss", "uplink",
                    "downlink", "time"):
            rnd.add_column(col, justify="right")
        for r in snap["rounds"][-15:]:
            rnd.add_row(
                str(r["round"]), f"v{r['global_version']}", str(len(r.get("participants", []))) or "-",
                ", ".join(r.get("stragglers", [])) or "-", _fmt(r.get("train_loss"), "{:.4f}"),
                _fmt(r.get("eval_loss"), "{:.4f}"), human_bytes(r.get("uplink_bytes")),
                human_bytes(r.get("downlink_bytes")), _fmt(r.get("duration_s"), "{:.1f}s"),
            )
        parts: list[Any] = [title, dev]
        if snap["rounds"]:
            parts.append(rnd)
        else:
            parts.append(Text("no round summary on the broker yet", style="dim"))
        return Group(*parts)


def _method_cell(st: dict, tm: dict) -> str:
    """The method, or the memory plan with its estimate / measured peak / budget (MB)."""
    mem = st.get("memory") or {}
    plan = mem.get("plan")
    if mem.get("refused"):
        return f"refused: needs {mem.get('min_host_mb', '?')} MB"
    if not plan:
        return st.get("method") or tm.get("method") or ""
    what = plan["method"] + ("" if plan.get("base") in (None, "float32") else f"/{plan['base']}")
    what += f" {plan['micro_batch']}x{plan['grad_accum']}" + (" ckpt" if plan.get("gradient_checkpointing") else "")
    peak = (tm.get("memory") or {}).get("peak_host_mb") or mem.get("peak_host_mb")
    figures = [f"~{plan['estimate_host_mb']:.0f}" if plan.get("estimate_host_mb") else "?"]
    if peak:
        figures.append(f"{peak:.0f}")
    if mem.get("budget_host_mb"):
        figures.append(f"{mem['budget_host_mb']:.0f}")
    return f"{what} {'/'.join(figures)} MB" + (" OVER" if mem.get("over_budget") else "")


def _fmt(v: Any, spec: str = "{}") -> str:
    return "" if v is None else spec.format(v)


class Recorder:
    """Appends every valid message as one JSON line (flushed, so a killed watch loses nothing)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - held open until close()
        self.lock = threading.Lock()
        self.lines = 0

    def write(self, topic: str, obj: dict[str, Any]) -> None:
        with self.lock:
            self.fh.write(json.dumps({"ts": time.time(), "topic": topic, "payload": obj}, separators=(",", ":")) + "\n")
            self.fh.flush()
            self.lines += 1

    def close(self) -> None:
        with self.lock:
            self.fh.close()


def connect_view(broker, topics: Topics, recorder: Recorder | None = None):
    """Subscribe a :class:`FleetView` to the federation's JSON topics; returns (view, transport)."""
    from fedmq_protocol.transport import MqttTransport

    view = FleetView(topics)

    def handler(topic: str, payload: bytes) -> None:
        obj = view.feed(topic, payload)
        if obj is not None and recorder is not None:
            recorder.write(topic, obj)

    t = MqttTransport(broker, f"fedmq-watch-{os.getpid()}-{time.time_ns() % 10**8}", clean_start=True)
    for flt in (topics.all_device_status, topics.all_device_telemetry, topics.coordinator_status, topics.rounds):
        t.subscribe(flt, handler, qos=1)
    t.connect(broker.connect_timeout_s)
    return view, t


def _broker_from_args(args):
    """BrokerConfig and Topics from --config (an agent or coordinator YAML) and explicit flags."""
    import yaml

    from fedmq.configfile import ConfigError, validate_config
    from fedmq_protocol.transport.config import BrokerConfig

    raw: dict[str, Any] = {}
    if args.config:
        p = Path(args.config)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
    broker = dict(raw.get("broker") or {})
    for key in ("url", "username", "password_file", "ca_file", "cert_file", "key_file"):
        value = getattr(args, key if key != "url" else "broker")
        if value is not None:
            broker[key] = value
    cfg = validate_config(broker, BrokerConfig, f"{args.config or 'watch'}: broker")
    topics = Topics(args.topic_root or raw.get("topic_root", "fedmq"),
                    args.federation or raw.get("federation", "default"))
    return cfg, topics


def cmd_watch(args) -> int:
    from rich.console import Console
    from rich.live import Live

    broker, topics = _broker_from_args(args)
    recorder = Recorder(Path(args.record)) if args.record else None
    console = Console()
    view, transport = connect_view(broker, topics, recorder)
    try:
        if args.once:
            # retained messages (statuses, last round) arrive right after subscribing; wait until
            # they stop coming
            deadline = time.monotonic() + args.wait
            start = time.monotonic()
            while time.monotonic() < deadline:
                time.sleep(0.1)
                quiet = time.monotonic() - max(view.last_message_at, start)
                if time.monotonic() - start >= 0.5 and quiet >= 0.5:
                    break
            if args.json:
                print(json.dumps(view.snapshot(), indent=1))
            else:
                console.print(view.render())
            return 0
        end = time.monotonic() + args.duration if args.duration else None
        refresh = 1.0 / max(0.1, args.refresh)

        def done() -> bool:
            return (end is not None and time.monotonic() >= end) or (args.until_finished and view.finished)

        if args.no_ui:
            while not done():
                time.sleep(0.2)
        else:
            with Live(view.render(), console=console, refresh_per_second=max(0.1, args.refresh)) as live:
                while not done():
                    time.sleep(refresh)
                    live.update(view.render())
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        transport.close()
        if recorder is not None:
            recorder.close()


def add_parser(sub) -> None:
    w = sub.add_parser("watch", help="live view of the fleet from the broker's topics")
    w.add_argument("--config", help="take broker, federation and topic_root from this agent/coordinator YAML")
    w.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (default mqtt://127.0.0.1:1883)")
    w.add_argument("--federation", help="federation name (default: from --config, else 'default')")
    w.add_argument("--topic-root", help="topic root (default: from --config, else 'fedmq')")
    w.add_argument("--username")
    w.add_argument("--password-file")
    w.add_argument("--ca-file")
    w.add_argument("--cert-file")
    w.add_argument("--key-file")
    w.add_argument("--once", action="store_true", help="print one snapshot of what the broker holds and exit")
    w.add_argument("--json", action="store_true", help="with --once: print the snapshot as JSON")
    w.add_argument("--wait", type=float, default=5.0, help="with --once: longest wait for retained messages (s)")
    w.add_argument("--record", help="append every message as a JSON line to this file (for fedmq report)")
    w.add_argument("--duration", type=float, help="stop after this many seconds")
    w.add_argument("--until-finished", action="store_true", help="stop when the coordinator reports finished")
    w.add_argument("--no-ui", action="store_true", help="no live view (e.g. only --record)")
    w.add_argument("--refresh", type=float, default=2.0, help="screen refreshes per second")
    w.set_defaults(func=cmd_watch)
