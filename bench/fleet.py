"""The real coordinator against simulated fleets: latency, memory, throughput, CPU, exactness.

Each row: a fresh loopback Mosquitto 2 (``max_queued_messages 10000``, as configs/mosquitto), a
fleet of simulated devices (``bench/fleet_harness.py``: one MQTT connection per device, all
driven by one event loop; signed statuses and updates; int2 LoRA differences of SmolLM2-135M's
default adapter size, r=8 on q_proj/v_proj, 460,800 values, through the agent's uplink encoder),
and the real coordinator (``python -m fedmq coordinator``, its own process: streaming FedAvg,
journal on disk, signatures checked) for one fit round of every device. An observer client
records the retained global as it arrives and the round summary.

Measured per row: time from the broker's acknowledgement of the last update (its arrival) to the
observer's receipt of the new global; the coordinator's own aggregate and publish times; its
peak RSS (psutil, sampled every 50 ms); updates ingested per second; coordinator and broker CPU
seconds (psutil); and the largest absolute difference between the published global and the
fleet's expected FedAvg (float64 from the decoded updates, computed by the harness).

A hierarchical row (``--sites K``): K site Mosquittos, each bridged to the central one with the
shipped topic lines (configs/mosquitto/site-bridge.conf), a site aggregator process
(``fedmq aggregator``) per site checking and summing its devices' updates into one signed partial,
and the devices spread over the site brokers; the coordinator takes the partials. Its published
global is compared with the expected FedAvg and with the flat row of the same fleet.

    OMP_NUM_THREADS=1 python bench/fleet.py                  # rows of 100, 1,000, 5,000 devices
    OMP_NUM_THREADS=1 python bench/fleet.py --devices 100 1000 --sites 4 --hierarchical 5000
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil

from bench.fleet_harness import Shapes, SimulatedFleet, lora_shapes, max_abs_diff
from fedmq_protocol import messages as m
from fedmq_protocol.seal import body_of
from fedmq_protocol.topics import Topics
from fedmq_protocol.transport import MqttTransport
from fedmq_protocol.transport.config import BrokerConfig

# SmolLM2-135M-Instruct's config.json (what the LoRA shapes depend on); checked against the
# cached checkpoint's when it is there
SMOLLM2_135M = {"hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
                "intermediate_size": 1536, "num_hidden_layers": 30}
ADAPTER = m.AdapterSpec()  # the default adapter: r=8, alpha 16, q_proj and v_proj
FEDERATION = "fleet"


def smollm2_shapes(adapter: m.AdapterSpec = ADAPTER) -> Shapes:
    """The LoRA shapes of SmolLM2-135M (from the cached config.json when present, else the copy above)."""
    try:
        from edge_agent.models import resolve_model

        cfg = json.loads((Path(resolve_model("smollm2-135m")) / "config.json").read_text())
        for key, value in SMOLLM2_135M.items():
            if int(cfg[key]) != value:
                raise ValueError(f"SmolLM2 config.json has {key}={cfg[key]}, expected {value}")
    except (ImportError, OSError, RuntimeError):
        cfg = SMOLLM2_135M
    return lora_shapes(cfg, adapter)


@dataclass
class Observer:
    """One ordinary client: the retained global (per version, with its arrival time), the round
    summaries and the coordinator's status counters."""

    url: str
    topics: Topics
    globals_: dict[int, tuple[float, m.GlobalModel]] = field(default_factory=dict)
    rounds: list[m.RoundSummary] = field(default_factory=list)
    statuses: list[tuple[float, dict[str, int]]] = field(default_factory=list)

    def start(self) -> Observer:
        self.transport = MqttTransport(BrokerConfig(url=self.url), f"observer-{time.time_ns()}", clean_start=True)
        self._new = threading.Event()

        def on_global(topic: str, payload: bytes) -> None:
            if payload:
                g = m.GlobalModel.from_msgpack(body_of(payload))
                self.globals_.setdefault(g.version, (time.time(), g))
                self._new.set()

        def on_round(topic: str, payload: bytes) -> None:
            if payload:
                self.rounds.append(m.RoundSummary.from_json(payload))

        def on_status(topic: str, payload: bytes) -> None:
            if payload:
                self.statuses.append((time.time(), m.CoordinatorStatus.from_json(payload).counters or {}))

        self.transport.subscribe(self.topics.global_model, on_global, qos=1, framed=True)
        self.transport.subscribe(self.topics.rounds, on_round, qos=1)
        self.transport.subscribe(self.topics.coordinator_status, on_status, qos=1)
        self.transport.connect(10)
        return self

    def wait_version(self, version: int, timeout: float, alive: Callable[[], bool]) -> tuple[float, m.GlobalModel]:
        deadline = time.monotonic() + timeout
        while version not in self.globals_:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no global v{version} within {timeout:.0f}s")
            if not alive():
                raise RuntimeError("the coordinator exited before publishing the global")
            self._new.wait(0.2)
            self._new.clear()
        return self.globals_[version]

    def close(self) -> None:
        self.transport.close()


class Sampler:
    """Peak RSS and CPU seconds of processes, sampled on a thread every ``every_s``."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s = every_s
        self.procs: dict[str, psutil.Process] = {}
        self.peak_rss: dict[str, int] = {}
        self.cpu: dict[str, float] = {}
        self.rss_trace: dict[str, list[tuple[float, int]]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def watch(self, name: str, pid: int) -> None:
        self.procs[name] = psutil.Process(pid)
        self.rss_trace[name] = []

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def cpu_now(self, name: str) -> float:
        try:
            t = self.procs[name].cpu_times()
            self.cpu[name] = t.user + t.system
        except psutil.Error:
            pass
        return self.cpu.get(name, 0.0)

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, p in list(self.procs.items()):
                try:
                    rss = p.memory_info().rss
                except psutil.Error:
                    continue
                self.peak_rss[name] = max(self.peak_rss.get(name, 0), rss)
                self.rss_trace[name].append((time.time(), rss))
                self.cpu_now(name)
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def coordinator_yaml(path: Path, url: str, n: int, keys: dict[str, str], state_dir: Path,
                     aggregator_keys: dict[str, str] | None = None) -> Path:
    import yaml

    cfg = {
        "federation": FEDERATION, "broker": {"url": url}, "state_dir": str(state_dir),
        "rounds": 1, "min_clients": n, "evaluate": False,
        "round_deadline_s": 900, "wait_for_devices_s": 900,
        "adapter": ADAPTER.model_dump(mode="json"),
        # every version a snapshot: the published global is exactly the coordinator's float32 weights
        "downlink": {"snapshot_every": 1},
        "device_keys": keys,
    }
    if aggregator_keys:
        cfg["aggregator_keys"] = aggregator_keys
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def raise_fd_limit(need: int) -> int:
    """Raise this process's soft fd limit toward ``need`` (within the hard limit); children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(hard, max(soft, need))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def site_yaml(path: Path, site: str, url: str, key: Path, devices: Sequence[str], keys: dict[str, str]) -> Path:
    import yaml

    cfg = {"site_id": site, "federation": FEDERATION, "broker": {"url": url}, "signing_key": str(key),
           "devices": list(devices), "device_keys": {d: keys[d] for d in devices if d in keys},
           "flush_margin_s": 5.0, "settle_s": 1.0}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_row(n: int, work: Path, shapes: Shapes, *, seed: int = 0, signed: bool = True,
            answer_spread_s: float = 0.0, distinct_updates: int | None = None, sites: int = 0,
            timeout_s: float = 600.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """One fit round of ``n`` simulated devices against the real coordinator; the row's figures
    (``published``: the new global's arrays, not written to JSON).

    Flat (``sites`` 0): every device on the central broker. Hierarchical: ``sites`` site brokers
    bridged to the central one, devices spread round-robin over them, one site aggregator each."""
    from fedmq_protocol.signing import generate_keypair
    from tests.federation import spawn, stop_all
    from tests.mosquitto import MosquittoBroker, bridge_config

    raise_fd_limit(2 * n + 1024)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    spread = answer_spread_s
    fleet_urls: list[str] = []
    broker = MosquittoBroker(work / "broker", max_queued_messages=10000).start()
    site_brokers: list[Any] = []
    procs: list[Any] = []
    sampler = Sampler().start()
    sampler.watch("broker", broker.proc.pid if broker.proc else 0)
    fleet: SimulatedFleet | None = None
    observer: Observer | None = None
    try:
        for i in range(sites):
            site_brokers.append(MosquittoBroker(work / f"site-{i}", max_queued_messages=10000,
                                                extra_config=bridge_config(broker, f"bridge-site-{i}")).start())
            sampler.watch(f"site-broker-{i}", site_brokers[-1].proc.pid if site_brokers[-1].proc else 0)
        fleet_urls = [b.url for b in site_brokers] or [broker.url]
        fleet = SimulatedFleet(fleet_urls, n, federation=FEDERATION, shapes=shapes, seed=seed, signed=signed,
                               answer_delay=(lambda i: spread * ((i * 0.6180339887) % 1.0)) if spread else None,
                               distinct_updates=distinct_updates)
        prep_s = time.perf_counter() - t0
        log(f"  {n} devices prepared in {prep_s:.1f}s ({fleet.distinct_updates} distinct updates)")
        topics = Topics("fedmq", FEDERATION)
        aggregator_keys: dict[str, str] = {}
        for i, site in enumerate(site_brokers):
            pem, pub = generate_keypair()
            key = work / f"site-{i}.key"
            key.write_bytes(pem)
            aggregator_keys[f"site-{i}"] = pub
            members = [d.device_id for d in fleet.devices if d.url == site.url]
            cfg_path = site_yaml(work / f"site-{i}.yaml", f"site-{i}", site.url, key, members, fleet.public_keys())
            agg = spawn(["aggregator", "--config", str(cfg_path)], work / f"site-{i}.log")
            procs.append(agg)
            sampler.watch(f"aggregator-{i}", agg.pid)
        deadline = time.monotonic() + 60
        for i in range(sites):
            while "aggregating on" not in (work / f"site-{i}.log").read_text():
                if time.monotonic() > deadline or procs[i].poll() is not None:
                    raise RuntimeError(f"aggregator {i} did not start: {(work / f'site-{i}.log').read_text()[-2000:]}")
                time.sleep(0.05)
        observer = Observer(broker.url, topics).start()
        cfg = coordinator_yaml(work / "coordinator.yaml", broker.url, n, fleet.public_keys(), work / "state",
                               aggregator_keys)
        coord = spawn(["coordinator", "--config", str(cfg)], work / "coordinator.log")
        procs.append(coord)
        sampler.watch("coordinator", coord.pid)
        deadline = time.monotonic() + 60
        while not observer.statuses:  # the coordinator is up: devices announce themselves to it
            if time.monotonic() > deadline or coord.poll() is not None:
                raise RuntimeError(f"the coordinator did not start: {(work / 'coordinator.log').read_text()[-2000:]}")
            time.sleep(0.05)
        t1 = time.perf_counter()
        fleet.start(timeout=timeout_s)
        connect_s = time.perf_counter() - t1
        log(f"  {n} devices connected in {connect_s:.1f}s")
        _, g0 = observer.wait_version(0, timeout_s, lambda: coord.poll() is None)
        rss_v0 = sampler.peak_rss.get("coordinator", 0)
        cpu_before = {k: sampler.cpu_now(k) for k in ("coordinator", "broker")}
        t_global, g1 = observer.wait_version(1, timeout_s, lambda: coord.poll() is None)
        cpu_round = {k: sampler.cpu_now(k) - cpu_before[k] for k in ("coordinator", "broker")}
        deadline = time.monotonic() + 30
        while not observer.rounds and time.monotonic() < deadline:
            time.sleep(0.05)
        coord.wait(timeout=60)
        times = fleet.fit_times()
        published = g1.tensors.decode_dense(max_elements=1 << 26)
        init_diff = max_abs_diff(g0.tensors.decode_dense(max_elements=1 << 26), fleet.init)
        diff = max_abs_diff(published, fleet.expected_global())
        summary = observer.rounds[-1] if observer.rounds else None
        counters = observer.statuses[-1][1] if observer.statuses else {}
        row = {
            "devices": n, "layout": f"{sites} sites" if sites else "flat", "brokers": len(fleet_urls),
            "signed": signed, "answer_spread_s": spread, "distinct_updates": fleet.distinct_updates,
            "update_bytes_mean": sum(fleet.update_bytes) / max(1, len(fleet.update_bytes)),
            "updates_acked": times.answered,
            "participants": len(summary.participants) if summary else None,
            "last_arrival_to_global_s": t_global - times.last_acked,
            "first_task_to_global_s": t_global - times.first_task,
            "arrivals_span_s": times.last_acked - times.first_acked,
            "offered_updates_per_s": times.answered / max(1e-9, times.last_acked - times.first_acked),
            "ingested_updates_per_s": times.answered / max(1e-9, t_global - times.first_acked),
            "coordinator_aggregate_s": summary.aggregate_s if summary else None,
            "coordinator_publish_s": summary.timings.get("global_publish_s") if summary else None,
            "coordinator_decode_s": summary.timings.get("update_decode_s") if summary else None,
            "coordinator_peak_rss_mb": sampler.peak_rss.get("coordinator", 0) / 2**20,
            "coordinator_rss_at_v0_mb": rss_v0 / 2**20,
            "coordinator_cpu_s_total": sampler.cpu.get("coordinator"),
            "coordinator_cpu_s_round": cpu_round["coordinator"],
            "broker_cpu_s_total": sampler.cpu.get("broker"),
            "broker_cpu_s_round": cpu_round["broker"],
            "max_abs_diff_vs_expected": diff, "init_max_abs_diff": init_diff,
            "coordinator_counters": counters, "fleet_errors": fleet.errors[:5],
            "prepare_s": prep_s, "connect_s": connect_s, "row_s": time.perf_counter() - t0,
        }
        if sites:
            row["aggregators_cpu_s_round"] = sum(sampler.cpu.get(f"aggregator-{i}", 0.0) for i in range(sites))
            row["aggregator_peak_rss_mb"] = max(
                sampler.peak_rss.get(f"aggregator-{i}", 0) for i in range(sites)) / 2**20
            row["site_brokers_cpu_s"] = sum(sampler.cpu.get(f"site-broker-{i}", 0.0) for i in range(sites))
            row["partials_accepted"] = counters.get("partials_accepted") if isinstance(counters, dict) else None
        if fleet.errors:
            raise RuntimeError(f"fleet errors: {fleet.errors[0]}")
        row["published"] = published
        return row
    finally:
        if observer is not None:
            observer.close()
        if fleet is not None:
            fleet.close()
        stop_all([p for p in procs if p is not None])
        sampler.stop()
        for b in site_brokers:
            b.stop()
        broker.stop()


def _spread(text: str) -> tuple[int, float]:
    try:
        n, secs = text.split("=", 1)
        return int(n), float(secs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--spread wants DEVICES=SECONDS (e.g. 1000=60), got {text!r}") from None


def main() -> int:
    from bench.report import command_line, machine, update_doc_section, write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, nargs="*", default=[100, 1000, 5000],
                    help="rows where every device answers the moment its task arrives (a burst)")
    ap.add_argument("--spread", type=_spread, nargs="*", default=[],
                    help="rows DEVICES=SECONDS where the devices answer spread over that many seconds")
    ap.add_argument("--distinct-updates", type=int, default=256,
                    help="different differences drawn (device i sends i mod this); each update is still its own")
    ap.add_argument("--hierarchical", type=int, nargs="*", default=[],
                    help="rows (bursts) where the devices sit on --sites site brokers, each with a site aggregator")
    ap.add_argument("--sites", type=int, default=4, help="site brokers (and aggregators) of the hierarchical rows")
    ap.add_argument("--unsigned", action="store_true", help="no device keys (signatures are on by default)")
    ap.add_argument("--timeout-s", type=float, default=600)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--render", action="store_true",
                    help="rewrite the docs section from bench/results/fleet.json (no run)")
    args = ap.parse_args()
    if args.render:
        rec = json.loads((Path(__file__).parent / "results" / "fleet.json").read_text())
        recorded = argparse.Namespace(**rec["args"])
        report(recorded, smollm2_shapes(), rec["rows"], rec["seconds"], rec["command"], rec["machine"],
               write_json, update_doc_section)
        return 0

    shapes = smollm2_shapes()
    t_start = time.perf_counter()
    rows = []
    plan = ([(n, 0.0, 0) for n in args.devices] + [(n, spread, 0) for n, spread in args.spread]
            + [(n, 0.0, args.sites) for n in args.hierarchical])
    flat_globals: dict[int, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-fleet-") as tmp:
        for n, spread, sites in plan:
            layout = f"{sites} site brokers" if sites else "flat"
            print(f"row: {n} devices, {layout}, answers over {spread:g}s", flush=True)
            row = run_row(n, Path(tmp) / f"{layout.replace(' ', '-')}-{n}-{spread:g}", shapes,
                          signed=not args.unsigned, answer_spread_s=spread, distinct_updates=args.distinct_updates,
                          sites=sites, timeout_s=args.timeout_s, log=lambda s: print(s, flush=True))
            published = row.pop("published")
            if not sites and not spread:
                flat_globals[n] = published
            elif sites and n in flat_globals:  # the same fleet (seed, keys aside) flat: the same updates
                row["max_abs_diff_vs_flat"] = max_abs_diff(published, flat_globals[n])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "coordinator_counters"}), flush=True)
    report(args, shapes, rows, time.perf_counter() - t_start, command_line(), machine(), write_json,
           None if args.no_doc else update_doc_section)
    return 0


def report(args: argparse.Namespace, shapes: Shapes, rows: list[dict], seconds: float, command: str,
           mach: dict, write_json: Callable, update_doc: Callable | None) -> None:
    from bench.report import md_table

    ref = next((r for r in rows if r["devices"] == 100 and not r["answer_spread_s"]), rows[0])
    for r in rows:
        r["rss_vs_ref_pct"] = 100 * (r["coordinator_peak_rss_mb"] / ref["coordinator_peak_rss_mb"] - 1)
        r["coordinator_cpu_ms_per_update"] = 1000 * r["coordinator_cpu_s_round"] / r["devices"]
        r["broker_cpu_ms_per_update"] = 1000 * r["broker_cpu_s_round"] / r["devices"]
    values = sum(math.prod(s) for s in shapes.values())
    out = {"benchmark": "fleet", "command": command, "machine": mach, "args": vars(args), "seconds": seconds,
           "adapter": ADAPTER.model_dump(mode="json"), "adapter_values": values, "reference_row": ref["devices"],
           "rows": rows}
    path = write_json("fleet", out)

    def arrivals(r: dict) -> str:
        return "burst" if not r["answer_spread_s"] else f"over {r['answer_spread_s']:g} s"

    table = [[f"{r['devices']:,}", r["layout"], arrivals(r), f"{r['update_bytes_mean']:,.0f}",
              f"{r['last_arrival_to_global_s']:.2f}", f"{r['coordinator_aggregate_s']:.3f}",
              f"{r['ingested_updates_per_s']:.1f}", f"{r['offered_updates_per_s']:.1f}",
              f"{r['coordinator_peak_rss_mb']:.0f}", f"{r['rss_vs_ref_pct']:+.1f} %",
              f"{r['coordinator_cpu_s_round']:.1f} ({r['coordinator_cpu_ms_per_update']:.1f})",
              f"{r['broker_cpu_s_round']:.1f} ({r['broker_cpu_ms_per_update']:.2f})",
              (f"{r['aggregators_cpu_s_round']:.1f} ({r['aggregator_peak_rss_mb']:.0f})"
               if "aggregators_cpu_s_round" in r else "–"),
              f"{r['max_abs_diff_vs_expected']:.1e}"] for r in rows]
    targets = []
    for r in rows:
        if r["devices"] == 1000:
            ok = r["last_arrival_to_global_s"] < 1.0
            targets.append(f"1,000 devices ({r['layout']}, {arrivals(r)}): last arrival → global "
                           f"{r['last_arrival_to_global_s']:.2f} s (target < 1 s: {'met' if ok else 'missed'})")
        if "max_abs_diff_vs_flat" in r:
            d = r["max_abs_diff_vs_flat"]
            targets.append(f"{r['devices']:,} devices through {r['layout']}: published global vs the flat row's "
                           f"max abs diff {d:.1e} (target identical: {'met' if d == 0 else 'missed'})")
        if r["devices"] > ref["devices"]:
            ok = abs(r["rss_vs_ref_pct"]) <= 10
            targets.append(f"{r['devices']:,} devices ({r['layout']}, {arrivals(r)}): coordinator peak RSS "
                           f"{r['rss_vs_ref_pct']:+.1f} % vs {ref['devices']} "
                           f"(target within 10 %: {'met' if ok else 'missed'})")
    md = (
        "## Fleets: the coordinator against simulated devices (`bench/fleet.py`)\n\n"
        f"`{command}` ({seconds / 60:.1f} min) — {mach['cores']} cores shared with other jobs (CPU figures are "
        f"noisy; compare ratios), {mach['date']}, commit {mach['commit']}.\n\n"
        "Each row: a fresh loopback Mosquitto 2 (`max_queued_messages 10000`, as `configs/mosquitto`), one fit "
        "round of every device with the real coordinator (`fedmq coordinator` process: streaming FedAvg, the "
        "open-round journal on disk, Ed25519 signatures on statuses and updates checked). Devices are "
        "simulated (`bench/fleet_harness.py`): one MQTT connection each, all driven by one event loop in "
        "one thread; signed statuses refreshed every 30 s with Last Wills, the agent's `UpdateBuilder`, int2 "
        f"differences of SmolLM2-135M's default LoRA (r=8 on q_proj/v_proj, {values:,} values) from the agent's "
        f"uplink encoder; {args.distinct_updates} different differences are drawn from seeds (device i sends "
        f"number i mod {args.distinct_updates}; each update is still decoded, checked, journalled and folded on its "
        "own), so the harness knows the FedAvg they make. Burst: every device answers the moment its task "
        "arrives; over S s: device i answers S·frac(i·0.618) s after it. Devices do not subscribe to the global "
        "(its fan-out to every device is not measured).\n\n"
        "Last arrival → global: from the broker's PUBACK of the last update to an observer client's receipt of "
        "the new retained global (includes draining the coordinator's backlog); aggregate: the coordinator's own "
        "`aggregate_s`. Ingested: updates / (global received − first update acknowledged); offered: updates / "
        f"arrival span. RSS vs the {ref['devices']}-device burst row. CPU: seconds during the round (ms per update). "
        "Site aggregators: their CPU seconds together and the largest one's peak RSS. "
        "Diff: max |published − expected FedAvg|.\n\n"
        + md_table(["devices", "layout", "arrivals", "update B", "last arrival → global s", "aggregate s",
                    "ingested /s", "offered /s", "coord. peak RSS MiB", "RSS vs ref", "coord. CPU s (ms/upd)",
                    "broker CPU s (ms/upd)", "site aggregators CPU s (peak RSS MiB)", "max abs diff"], table)
        + "\n\n" + "; ".join(targets) + ".\n"
    )
    if update_doc is not None:
        update_doc("fleet", md)
    print(md)
    print(f"results: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
