"""``fedmq demo``: a whole federation on one machine.

Embedded broker (unless ``--broker``), synthetic non-IID data, one coordinator (in this process,
it needs no model) and N agents as separate processes, each configured by its own YAML file
written to the work directory, exactly as a device would be.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedmq_protocol import messages as m
from fedmq_protocol.topics import Topics

if TYPE_CHECKING:
    from fedmq_protocol.transport.config import BrokerConfig

# zeroth-order (FedKSeed) on the full model: MeZO's scale of perturbation and learning rate
ZO_DEMO = {"seed": 0, "num_seeds": 1024, "eps": 1e-3, "direction": "gaussian", "target": "full"}
ZO_DEMO_LR = 1e-5
# split learning: the device runs the embedding, 2 blocks at each end and the head; int8 activations
SPLIT_DEMO = {"l_head": 2, "l_tail": 2, "activations": "int8", "gradients": "bfloat16", "zstd": True}
# FedKRSO: K = 4 subspaces of rank 8 per round, intervals of 4 steps, every linear of the blocks
KRSO_DEMO = {"seed": 0, "num_seeds": 4, "rank": 8, "interval": 4, "target_modules": ["all-linear"],
             "checkpoint_every": 5}
KRSO_DEMO_LR = 3e-4
LORA_DEMO_LR = 2e-3
# knowledge distillation: FedMKT-style best-per-probe teacher, top-16 log-probs per answer token
# confidence weighting (power 1.5) and select=better: the settings under which every device, of a
# one-model and of a mixed federation, gained on the families it never saw (bench/kd.py)
KD_DEMO = {"top_k": 16, "weighting": "confidence", "confidence_power": 1.5, "select": "better", "lambda": 1.0,
           "temperature": 1.0, "max_response_tokens": 16}
KD_PROBES_PER_FAMILY = 8


class DemoError(RuntimeError):
    """The demo could not finish: a device process died, or the rounds stopped short."""


@dataclass(frozen=True)
class DemoOptions:
    broker: str | None = None
    agents: int = 3
    rounds: int = 3
    model: str = "smollm2-135m"
    method: str = "qlora"
    summary: Path | None = None
    workdir: Path = Path("fedmq-demo")
    local_steps: int = 8
    lr: float | None = None  # None: 2e-3 (LoRA, QLoRA), 1e-5 (zo), 3e-4 (krso)
    batch_size: int = 4
    max_seq_len: int = 96
    samples_per_device: int = 120
    eval_samples: int = 48
    federation: str = "demo"
    mqtt_version: str | None = None  # None: 3.1.1 on the embedded broker (amqtt), else 5
    uplink: str = "int4"  # agent uplink.values, with error feedback (float32: dense fp32 updates)
    downlink: str = "int8"  # coordinator downlink.values (float32: dense fp32 differences, no zstd)
    asynchronous: bool = False  # FedBuff rounds: every device busy, a new global every agents - 1 updates

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        return {"zo": ZO_DEMO_LR, "krso": KRSO_DEMO_LR}.get(self.method, LORA_DEMO_LR)


def write_configs(opts: DemoOptions, broker_url: str, model_path: str, data_dir: Path) -> tuple[Path, list[Path]]:
    """The YAML files a real deployment would have: one coordinator, one per device."""
    wd = opts.workdir
    mqtt_version = opts.mqtt_version or ("3.1.1" if opts.broker is None else "5")  # amqtt speaks 3.1.1 only
    broker = {"url": broker_url, "mqtt_version": mqtt_version}
    threads = max(1, (os.cpu_count() or 2) // opts.agents)
    coord = {
        "federation": opts.federation,
        "broker": broker,
        "state_dir": str(wd / "state" / "coordinator"),
        "model": opts.model,
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "fit": {"local_steps": opts.local_steps, "lr": opts.learning_rate, "batch_size": opts.batch_size,
                "max_seq_len": opts.max_seq_len, "max_grad_norm": 1.0},
        # exact float32 snapshots with zstd; int8 differences with server-side error feedback
        "downlink": {"snapshot_every": 10, "values": opts.downlink, "zstd": opts.downlink != "float32"},
        "server_optimizer": {"name": "fedavg", "lr": 1.0},
        "rounds": opts.rounds,
        "min_clients": opts.agents,
        "round_deadline_s": 1800,
        # every device holds the same eval file: one of them computes the loss of each global
        "eval_max_devices": 1,
        "eval_deadline_s": 900,
        "wait_for_devices_s": 600,
    }
    if opts.method == "zo":
        coord["zo"] = {**ZO_DEMO, "lr": opts.learning_rate}
    if opts.method == "krso":
        coord["krso"] = dict(KRSO_DEMO)  # Adam on B at fit.lr
    models = [model_path] * opts.agents
    if opts.method == "kd":
        coord["kd"] = {**KD_DEMO, "probe_path": str(write_probe_set(data_dir))}
        coord["model"] = None  # devices hold models of different sizes (one tokenizer)
        coord.pop("eval_max_devices")  # every device evaluates its own model
        if opts.agents > 1:  # the last device runs half of the model's blocks, spread over its depth
            models[-1] = f"{model_path}:spread={max(1, num_blocks(model_path) // 2)}"
    if opts.method == "split":
        coord["split"] = SPLIT_DEMO
    if opts.asynchronous:  # --rounds global versions, each from agents - 1 updates while all devices train
        coord["asynchronous"] = {"enabled": True, "buffer_size": max(1, opts.agents - 1),
                                 "concurrency": opts.agents, "max_staleness": 4}
        coord["min_clients"] = 1
    coord_path = wd / "coordinator.yaml"
    coord_path.write_text(yaml.safe_dump(coord, sort_keys=False))
    agent_paths = []
    for i in range(opts.agents):
        agent = {
            "device_id": f"device-{i}",
            "federation": opts.federation,
            "broker": broker,
            "model": models[i],
            "method": opts.method,
            "data": {"train": str(data_dir / f"device_{i}.jsonl"), "eval": str(data_dir / "eval.jsonl")},
            "state_dir": str(wd / "state" / f"device-{i}"),
            "training": {"torch_threads": threads},
            "telemetry_interval_s": 1.0,
            # int4 + error feedback; uplink="float32" for dense fp32 updates
            "uplink": {"values": opts.uplink, "error_feedback": True},
        }
        p = wd / f"agent-{i}.yaml"
        p.write_text(yaml.safe_dump(agent, sort_keys=False))
        agent_paths.append(p)
    return coord_path, agent_paths


def num_blocks(model_path: str) -> int:
    """Decoder blocks of a local checkpoint (``num_hidden_layers`` of its config.json)."""
    return int(json.loads((Path(model_path) / "config.json").read_text()).get("num_hidden_layers", 1))


def write_probe_set(data_dir: Path, per_family: int = KD_PROBES_PER_FAMILY) -> Path:
    """The kd demo's public probe set: prompts with their answers from every synthetic family,
    none of them an eval or training prompt."""
    import random

    from edge_agent.data import DEFAULT_FAMILIES, load_jsonl, make_examples

    avoid = {e.prompt for f in sorted(data_dir.glob("*.jsonl")) if f.name != "probes.jsonl" for e in load_jsonl(f)}
    rng = random.Random("fedmq-demo-probes")
    path = data_dir / "probes.jsonl"
    with open(path, "w") as fh:
        for fam in DEFAULT_FAMILIES:
            for ex in make_examples(fam, per_family, rng, avoid):
                fh.write(json.dumps({"prompt": ex.prompt, "response": ex.response, "family": fam}) + "\n")
    return path


def write_split_server_config(opts: DemoOptions, broker_url: str, model_path: str) -> Path:
    """The split server's YAML (``--method split``): the middle blocks of the devices' model."""
    wd = opts.workdir
    mqtt_version = opts.mqtt_version or ("3.1.1" if opts.broker is None else "5")
    cfg = {
        "federation": opts.federation,
        "broker": {"url": broker_url, "mqtt_version": mqtt_version},
        "model": model_path,
        "adapter": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "split": SPLIT_DEMO,
        "state_dir": str(wd / "state" / "split-server"),
        "torch_threads": max(1, (os.cpu_count() or 2) // 2),
    }
    path = wd / "split-server.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _wait_for_split_server(broker: BrokerConfig, topics: Topics, proc: subprocess.Popen, log: Path,
                           timeout: float = 600) -> None:
    """Until the split server's retained status says online (it must see the round's tasks)."""
    from fedmq_protocol.modes.split import server_status_topic
    from fedmq_protocol.transport import MqttTransport

    online = threading.Event()

    def on_status(topic: str, payload: bytes) -> None:
        with contextlib.suppress(ValueError):
            if payload and json.loads(payload).get("online"):
                online.set()

    t = MqttTransport(broker, f"fedmq-demo-split-{os.getpid()}", clean_start=True)
    t.subscribe(server_status_topic(topics.base), on_status, qos=1)
    t.connect(10)
    try:
        deadline = time.monotonic() + timeout
        while not online.wait(0.5):
            if proc.poll() is not None:
                raise DemoError(exit_message("split server", proc.returncode, log))
            if time.monotonic() > deadline:
                raise DemoError(f"split server not online after {timeout:.0f}s; see {log}")
    finally:
        t.close()


def summary_table(history: list[m.RoundSummary]) -> Table:
    evaluators = max((h.eval_devices for h in history), default=0)
    t = Table(title="fedmq demo: per round",
              caption=f"fit: time to the new global; eval: time to its loss on {evaluators} device(s)")
    for col in ("round", "participants", "train loss", "eval loss", "uplink", "downlink", "fit", "eval"):
        t.add_column(col, justify="right")
    for h in history:
        fit_s = h.fit_s if h.fit_s is not None else (h.duration_s if h.round else None)
        t.add_row(
            str(h.round),
            str(len(h.participants)) if h.round else "baseline",
            "" if h.train_loss is None else f"{h.train_loss:.4f}",
            "" if h.eval_loss is None else f"{h.eval_loss:.4f}",
            _fmt_bytes(h.uplink_bytes),
            _fmt_bytes(h.downlink_bytes),
            f"{fit_s:.1f}s" if h.round and fit_s is not None else "",
            "" if h.eval_s is None or h.eval_loss is None else f"{h.eval_s:.1f}s",
        )
    return t


def _fmt_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def summary_json(history: list[m.RoundSummary], opts: DemoOptions) -> dict:
    return {
        "model": opts.model,
        "method": opts.method,
        "agents": opts.agents,
        "uplink": opts.uplink,
        "downlink": opts.downlink,
        "rounds": [
            {
                "round": h.round,
                "participants": list(h.participants),
                "train_loss": h.train_loss,
                "eval_loss": h.eval_loss,
                "eval_devices": h.eval_devices,
                "uplink_bytes": h.uplink_bytes,
                "downlink_bytes": h.downlink_bytes,
                "duration_s": round(h.duration_s, 3),
                "fit_s": None if h.fit_s is None else round(h.fit_s, 3),
                "eval_s": None if h.eval_s is None else round(h.eval_s, 3),
                "timings": h.timings,
            }
            for h in history
        ],
    }


_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Exit|Interrupt|Failed|Refused)\b")


def last_error(log_path: Path, max_bytes: int = 64 * 1024) -> str | None:
    """The line of a device log that says why it stopped: a traceback's last line, else the last
    ``fedmq: error:`` or ERROR/CRITICAL log line, else the last line (None: an empty log)."""
    try:
        with open(log_path, "rb") as fh:
            fh.seek(max(0, log_path.stat().st_size - max_bytes))
            lines = [ln.strip() for ln in fh.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return None
    for ln in reversed(lines):
        if _EXCEPTION_LINE.match(ln):
            return ln
    for ln in reversed(lines):
        if ln.startswith("fedmq: error:"):
            return ln.removeprefix("fedmq: error:").strip()
        match = re.search(r" (?:ERROR|CRITICAL) [\w.]+: (.*)$", ln)
        if match:
            return match.group(1)
    return lines[-1] if lines else None


def exit_message(device_id: str, returncode: int, log_path: Path) -> str:
    """``device D exited (code N): <its last error line>``."""
    why = last_error(log_path)
    return f"device {device_id} exited (code {returncode})" + (f": {why}" if why else "") + f"; see {log_path}"


def run_demo(opts: DemoOptions) -> list[m.RoundSummary]:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.coordinator import Coordinator
    from edge_agent.data import synthesize
    from edge_agent.models import resolve_model
    from fedmq.configfile import load_config
    from fedmq.embedded_broker import EmbeddedBroker
    from fedmq_protocol.transport import MqttTransport

    console = Console(stderr=True)
    wd = opts.workdir
    wd.mkdir(parents=True, exist_ok=True)
    # A fresh federation every run: old coordinator state would skip the rounds.
    for stale in (wd / "state").glob("*/*"):
        if stale.is_file():
            stale.unlink()

    embedded = None
    if opts.broker is None:
        embedded = EmbeddedBroker().start()
        broker_url = embedded.url
        console.print(f"[bold]broker[/] embedded amqtt on {broker_url}")
    else:
        broker_url = opts.broker
        console.print(f"[bold]broker[/] {broker_url}")

    data_dir = wd / "data"
    manifest = synthesize(data_dir, num_devices=opts.agents, samples_per_device=opts.samples_per_device,
                          eval_samples=opts.eval_samples, seed=0)
    for dev in manifest["devices"]:
        console.print(f"[bold]data[/] device-{dev['device']}: {dev['num_samples']} examples of "
                      f"{', '.join(dev['families'])}")
    with console.status(f"fetching model {opts.model} (first use converts it, ~30 s)"):
        model_path = resolve_model(opts.model)
    console.print(f"[bold]model[/] {opts.model} -> {model_path}")

    coord_path, agent_paths = write_configs(opts, broker_url, model_path, data_dir)
    logs = wd / "logs"
    logs.mkdir(exist_ok=True)
    procs: list[subprocess.Popen] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    servers: list[subprocess.Popen] = []  # the split server (--method split), stopped with the agents
    if opts.method == "split":
        from fedmq_protocol.transport.config import BrokerConfig

        server_cfg = write_split_server_config(opts, broker_url, model_path)
        with open(logs / "split-server.log", "w") as log_file:
            servers.append(subprocess.Popen([sys.executable, "-m", "fedmq", "split-server", "--config",
                                             str(server_cfg)], stdout=log_file, stderr=subprocess.STDOUT, env=env))
        mqtt_version = opts.mqtt_version or ("3.1.1" if opts.broker is None else "5")
        try:
            _wait_for_split_server(BrokerConfig(url=broker_url, mqtt_version=mqtt_version),
                                   Topics("fedmq", opts.federation), servers[0], logs / "split-server.log")
        except BaseException:
            servers[0].kill()
            if embedded:
                embedded.stop()
            raise
        console.print(f"[bold]split server[/] the middle blocks of {opts.model} (the devices keep "
                      f"{SPLIT_DEMO['l_head']} + {SPLIT_DEMO['l_tail']}); log {logs / 'split-server.log'}")
    for i, p in enumerate(agent_paths):
        with open(logs / f"device-{i}.log", "w") as log_file:  # the child keeps its own copy of the descriptor
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fedmq", "agent", "--config", str(p)],
                stdout=log_file, stderr=subprocess.STDOUT, env=env,
            ))
    console.print(f"[bold]agents[/] {opts.agents} processes ({opts.method}, uplink {opts.uplink}, "
                  f"downlink {opts.downlink}); logs in {logs}")

    cfg = load_config(coord_path, CoordinatorConfig)
    history: list[m.RoundSummary] = []
    topics = Topics(cfg.topic_root, cfg.federation)
    watcher = MqttTransport(cfg.broker.model_copy(update={}), "fedmq-demo-watch", clean_start=True)

    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
        console=console, transient=False,
    ) as progress:
        rounds_bar = progress.add_task("rounds", total=opts.rounds, info="waiting for devices")
        device_bars = {
            f"device-{i}": progress.add_task(f"device-{i}", total=opts.local_steps, info="loading")
            for i in range(opts.agents)
        }

        def on_telemetry(topic: str, payload: bytes) -> None:
            try:
                t = m.Telemetry.from_json(payload)
            except Exception:  # noqa: BLE001 - a bad telemetry message must not break the progress display
                return
            bar = device_bars.get(t.device_id)
            if bar is None:
                return
            info = t.state if t.loss is None or t.state != "training" else f"{t.state} loss {t.loss:.3f}"
            step = t.step if t.state == "training" and t.step is not None else progress.tasks[bar].completed
            progress.update(bar, completed=step, info=info)

        watcher.subscribe(topics.all_device_telemetry, on_telemetry, qos=0)
        watcher.connect(cfg.broker.connect_timeout_s)

        def on_round(s: m.RoundSummary) -> None:
            history.append(s)
            loss = "n/a" if s.eval_loss is None else f"{s.eval_loss:.4f}"
            progress.update(rounds_bar, completed=s.round, info=f"round {s.round}: eval loss {loss}")
            for bar in device_bars.values():
                progress.update(bar, completed=0)

        coordinator = Coordinator(cfg, on_round=on_round)
        failed = threading.Event()
        exits: list[str] = []  # why the first device process that died did

        def watch_agents() -> None:
            while not failed.is_set():
                for i, p in enumerate(procs):
                    if p.poll() is not None:
                        exits.append(exit_message(f"device-{i}", p.returncode, logs / f"device-{i}.log"))
                        failed.set()
                        coordinator.stop()
                        return
                time.sleep(1)

        watcher_thread = threading.Thread(target=watch_agents, daemon=True)
        watcher_thread.start()
        try:
            coordinator.run()
        except Exception:
            if not failed.is_set():
                raise
            watcher_thread.join(timeout=5)
            if not exits:
                raise
        finally:
            failed.set()
            coordinator.close("finished")
            watcher.close()
            for proc in procs + servers:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs + servers:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if embedded:
                embedded.stop()

    if exits:
        raise DemoError(exits[0])
    console.print(summary_table(history))
    if opts.summary:
        opts.summary.parent.mkdir(parents=True, exist_ok=True)
        opts.summary.write_text(json.dumps(summary_json(history, opts), indent=1))
        console.print(f"summary written to {opts.summary}")
    if len([h for h in history if h.round > 0]) < opts.rounds:
        raise DemoError(f"demo stopped after {len(history) - 1} of {opts.rounds} rounds; see {logs}")
    return history
