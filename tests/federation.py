"""Helpers to run a real federation in tests: config files and agent/coordinator processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from fedmq_protocol import messages as m
from fedmq_protocol.globals import GlobalSync
from fedmq_protocol.seal import body_of
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport
from fedmq_protocol.transport.config import BrokerConfig

REPO = Path(__file__).resolve().parents[1]


def fedavg(global_weights: dict[str, np.ndarray], updates: list[m.Update]) -> dict[str, np.ndarray]:
    """Independent sample-weighted FedAvg: global + sum_i n_i/N * delta_i (updates decoded densely)."""
    total = sum(u.num_samples for u in updates)
    out = {}
    for name, w in global_weights.items():
        acc = w.astype(np.float64)
        for u in updates:
            delta = u.tensors.decode_dense(max_elements=1 << 24)[name]
            acc = acc + (u.num_samples / total) * delta.astype(np.float64)
        out[name] = acc.astype(np.float32)
    return out


# The exact codecs, for tests that check FedAvg arithmetic against the updates sent (the
# defaults, int4 updates and int8 differences, are lossy by design).
DENSE_UPLINK = {"values": "float32"}
DENSE_DOWNLINK = {"values": "float32", "zstd": False}


def write_yaml(path: Path, obj: dict) -> Path:
    path.write_text(yaml.safe_dump(obj, sort_keys=False))
    return path


def spawn(args: list[str], log: Path, env: dict | None = None, module: str = "fedmq") -> subprocess.Popen:
    """``python -m fedmq ARGS`` (or another entry ``module``, e.g. tests.faulty_agent) in the repo."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(
        [sys.executable, "-m", module, *args], cwd=REPO, env=full_env,
        stdout=open(log, "w"), stderr=subprocess.STDOUT,
    )


def stop_all(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@dataclass
class Capture:
    """A test-side MQTT client recording every update and global it sees, decoded."""

    url: str
    topics: Topics
    chunk_size: int = 256 * 1024
    updates: list[m.Update] = field(default_factory=list)
    globals_: dict[int, m.GlobalModel] = field(default_factory=dict)  # snapshots and differences
    # the global of every version as devices reconstruct it (fedmq_protocol.globals)
    weights: dict[int, dict] = field(default_factory=dict)
    rounds: list[m.RoundSummary] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> Capture:
        self.transport = MqttTransport(BrokerConfig(url=self.url, chunk_size=self.chunk_size),
                                       f"capture-{time.time_ns()}", clean_start=True)

        def on_update(topic: str, payload: bytes) -> None:
            with self.lock:
                self.updates.append(m.Update.from_msgpack(payload))

        sync = GlobalSync(max_elements=1 << 30)

        def on_global(topic: str, payload: bytes) -> None:
            if not payload:
                return
            g = m.GlobalModel.from_msgpack(body_of(payload))
            with self.lock:
                self.globals_[g.version] = g
                sync.offer(g)
                if sync.version is not None:
                    self.weights[sync.version] = sync.arrays

        def on_round(topic: str, payload: bytes) -> None:
            if payload:
                with self.lock:
                    self.rounds.append(m.RoundSummary.from_json(payload))

        self.transport.subscribe(self.topics.all_device_updates, on_update, qos=1, framed=True)
        self.transport.subscribe(self.topics.global_model, on_global, qos=1, framed=True)
        self.transport.subscribe(self.topics.all_global_diffs, on_global, qos=1, framed=True)
        self.transport.subscribe(self.topics.rounds, on_round, qos=1)
        self.transport.connect(10)
        return self

    def close(self) -> None:
        self.transport.close()


def agent_config(tmp: Path, i: int, url: str, data_dir: Path, *, model: str = "tiny-llama",
                 method: str = "lora", federation: str = "test", broker: dict | None = None,
                 data_file: str | None = None, **extra) -> Path:
    cfg = {
        "device_id": f"dev-{i}",
        "federation": federation,
        "broker": {"url": url, **(broker or {})},
        "model": model,
        "method": method,
        "data": {"train": str(data_dir / (data_file or f"device_{i}.jsonl")), "eval": str(data_dir / "eval.jsonl")},
        "state_dir": str(tmp / f"agent-{i}"),
        "telemetry_interval_s": 1.0,
        "training": {"torch_threads": 1},
        **extra,
    }
    return write_yaml(tmp / f"agent-{i}.yaml", cfg)


def coordinator_config(tmp: Path, url: str, *, rounds: int, min_clients: int, federation: str = "test",
                       fit: dict | None = None, broker: dict | None = None, **extra) -> Path:
    cfg = {
        "federation": federation,
        "broker": {"url": url, **(broker or {})},
        "state_dir": str(tmp / "coordinator"),
        "rounds": rounds,
        "min_clients": min_clients,
        "fit": fit or {"local_steps": 10, "lr": 3e-3, "batch_size": 4, "max_seq_len": 64},
        "round_deadline_s": 300,
        "eval_deadline_s": 300,
        "wait_for_devices_s": 120,
        **extra,
    }
    return write_yaml(tmp / "coordinator.yaml", cfg)


def wait_for_status(url: str, device_id: str, predicate, *, federation: str = "test", timeout: float = 60):
    """Wait until the retained/live status of ``device_id`` satisfies ``predicate``; return it."""
    topics = Topics("fedmq", federation)
    latest: list[m.DeviceStatus] = []
    ok = threading.Event()

    def on_status(topic: str, payload: bytes) -> None:
        if payload:
            st = m.DeviceStatus.from_json(payload)
            latest.append(st)
            if predicate(st):
                ok.set()

    t = MqttTransport(BrokerConfig(url=url), f"status-watch-{time.time_ns()}", clean_start=True)
    t.subscribe(topics.device_status(device_id), on_status, qos=1)
    t.connect(10)
    try:
        if not ok.wait(timeout):
            raise AssertionError(f"{device_id} status never matched; last: {latest[-1:] or None}")
        return [s for s in latest if predicate(s)][-1]
    finally:
        t.close()
