"""The ``fedmq`` command line.

Each sub-command imports what it needs when it runs: ``fedmq coordinator`` never loads torch.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

LOADING_ALLOWANCE_S = 900.0  # how long a model load may go without progress before the watchdog fires


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _on_sigterm(stop: threading.Event, notifier=None) -> None:
    def handler(signum, frame):
        if notifier is not None:
            notifier.stopping("stopping: finishing or abandoning the current step")
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_agent(args: argparse.Namespace) -> int:
    from edge_agent.config import AgentConfig
    from fedmq.configfile import load_config

    cfg = load_config(args.config, AgentConfig)
    from edge_agent.agent import create_agent
    from fedmq.sdnotify import Notifier, Watchdog

    agent = create_agent(cfg)
    sd = Notifier()
    # Loading a model reports no progress; a multi-GB QLoRA load on a Jetson takes minutes.
    dog = Watchdog(sd, lambda: agent.alive_at, lambda: f"{agent.state}, global v{agent.global_version}",
                   allowance=lambda: LOADING_ALLOWANCE_S if agent.state == "loading" else 0.0)
    agent.on_ready.append(lambda: (sd.ready(f"{cfg.device_id}: connected to {cfg.broker.url}"), dog.start()))
    _on_sigterm(agent.stop_event, sd)
    try:
        agent.run()
    finally:
        dog.stop()
    _exit_without_teardown(0)
    return 0  # pragma: no cover - only reached when exiting is patched out


def _exit_without_teardown(code: int) -> None:
    """Exit once the agent has shut down cleanly, skipping the interpreter's teardown.

    Tearing down torch, transformers and peft modules takes seconds on an edge CPU and does no useful
    work: the agent has already closed its connection and written its state. Under systemd those seconds
    would pass with the watchdog no longer fed. Logs and standard streams are flushed first.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken pipe must not block the exit
            stream.flush()
    os._exit(code)


def _serve(service: Any, ready_text: str, status: Callable[[], str]) -> int:
    """Run a broker-connected service (``transport``, ``alive_at``, ``run``, ``stop``, ``close``)
    under systemd: READY once the broker accepted it (repeats on reconnect are harmless), the
    watchdog fed while ``alive_at`` moves, SIGTERM stops it."""
    from fedmq.sdnotify import Notifier, Watchdog

    sd = Notifier()
    dog = Watchdog(sd, lambda: service.alive_at, status)

    def on_connect(session_present: bool) -> None:
        sd.ready(ready_text)
        dog.start()

    service.transport.on_connect.append(on_connect)
    stop = threading.Event()
    _on_sigterm(stop, sd)

    def stop_on_signal() -> None:
        stop.wait()
        service.stop()

    threading.Thread(target=stop_on_signal, daemon=True).start()
    try:
        service.run()
    finally:
        dog.stop()
        service.close()
    return 0


def cmd_coordinator(args: argparse.Namespace) -> int:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.coordinator import Coordinator
    from fedmq.configfile import load_config

    overrides = {"rounds": args.rounds} if args.rounds else None
    cfg = load_config(args.config, CoordinatorConfig, overrides)
    coord = Coordinator(cfg)
    return _serve(coord, f"connected to {cfg.broker.url}",
                  lambda: f"round {coord.state.round_completed}/{cfg.rounds}, global v{coord.state.global_version}")


def cmd_aggregator(args: argparse.Namespace) -> int:
    from broker_coordinator.site import SiteAggregator, SiteAggregatorConfig
    from fedmq.configfile import load_config

    cfg = load_config(args.config, SiteAggregatorConfig)
    agg = SiteAggregator(cfg)
    return _serve(agg, f"site {cfg.site_id}: connected to {cfg.broker.url}",
                  lambda: f"site {cfg.site_id}: {agg.counters.partials_sent} partial(s) sent")


def cmd_split_server(args: argparse.Namespace) -> int:
    from fedmq.configfile import load_config
    from split_server.config import SplitServerConfig

    cfg = load_config(args.config, SplitServerConfig)
    from fedmq.sdnotify import Notifier, Watchdog
    from split_server.server import SplitServer

    server = SplitServer(cfg)
    sd = Notifier()
    _on_sigterm(server.stop_event, sd)
    server.load()  # the model: before the watchdog starts (a first start may fetch and convert it)
    server.start()
    dog = Watchdog(sd, lambda: server.alive_at, lambda: f"server step {server.server_step}")
    sd.ready(f"split server: connected to {cfg.broker.url}")
    dog.start()
    try:
        server.run()
    finally:
        dog.stop()
    return 0


def cmd_split_plan(args: argparse.Namespace) -> int:
    """The largest split cut a device with ``--memory-budget`` holds (no torch: estimates only)."""
    from edge_agent.config import MemoryBudgetConfig
    from edge_agent.memory import BudgetTooSmall, ModelShape
    from edge_agent.memory.estimator import DeviceKind
    from edge_agent.memory.planner import choose_cut
    from edge_agent.models import resolve_model
    from fedmq.configfile import ConfigError
    from fedmq_protocol.messages import AdapterSpec, FitConfig
    from fedmq_protocol.modes.split import SplitSpec

    spec, adapter, fit = SplitSpec(), AdapterSpec(), FitConfig()
    if args.config:
        from broker_coordinator.config import CoordinatorConfig
        from fedmq.configfile import load_config

        coord = load_config(args.config, CoordinatorConfig)
        spec = getattr(coord, "split", None) or spec
        adapter, fit = coord.adapter, coord.fit
    l_head, l_tail = args.l_head or spec.l_head, args.l_tail or spec.l_tail
    batch, seq = args.batch_size or fit.batch_size, args.seq_len or fit.max_seq_len
    try:
        budget_cfg = MemoryBudgetConfig.model_validate(args.memory_budget)
    except ValueError as exc:
        raise ConfigError(f"--memory-budget {args.memory_budget!r}: {exc}") from None
    try:
        shape = ModelShape.from_path(resolve_model(args.model, log=lambda *a: None))
    except ValueError as exc:
        raise ConfigError(f"--model {args.model!r}: {exc}") from None
    device: DeviceKind = "cuda" if args.device == "cuda" else "cpu"
    try:
        plan = choose_cut(shape, budget_cfg.budget(device), l_head=l_head, l_tail=l_tail, batch_size=batch,
                          seq_len=seq, lora_r=adapter.r, target_modules=tuple(adapter.target_modules),
                          device=device)
    except BudgetTooSmall as exc:
        import math

        keep = 1.0 - budget_cfg.safety_margin
        need = "" if exc.min_host_mb is None else f"host_mb: {math.ceil(exc.min_host_mb / keep)}"
        if exc.min_gpu_mb is not None:
            need += f", gpu_mb: {math.ceil(exc.min_gpu_mb / keep)}"
        smallest = exc.smallest.label() if exc.smallest is not None else "none"
        print(f"no cut of at most l_head={l_head} l_tail={l_tail} fits memory budget "
              f"{budget_cfg.limit(device).describe()}: the smallest is {smallest}; set memory_budget to at least "
              f"{need} ({100 * budget_cfg.safety_margin:.0f} % safety margin)", file=sys.stderr)
        return 1
    assert plan.cut is not None
    print(f"split:\n  l_head: {plan.cut[0]}\n  l_tail: {plan.cut[1]}\n"
          f"# {plan.label()}; the split server runs {shape.num_layers - sum(plan.cut)} of {shape.num_layers} blocks")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from broker_coordinator.staleness import NOT_ASYNCHRONOUS
    from fedmq.demo import DemoError, DemoOptions, run_demo

    if args.mqtt_version == "5" and not args.broker:
        print("fedmq: error: the embedded broker speaks MQTT 3.1.1 only; --mqtt-version 5 needs --broker",
              file=sys.stderr)
        return 2
    opts = DemoOptions(
        broker=args.broker, agents=args.agents, rounds=args.rounds, model=args.model, method=args.method,
        summary=Path(args.summary) if args.summary else None, workdir=Path(args.workdir),
        local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
        mqtt_version=args.mqtt_version, uplink=args.uplink, downlink=args.downlink,
        asynchronous=args.asynchronous,
    )
    if opts.asynchronous and opts.method in NOT_ASYNCHRONOUS:
        print(f"fedmq: error: --async: the {opts.method} method cannot run asynchronous rounds: "
              f"{NOT_ASYNCHRONOUS[opts.method]}", file=sys.stderr)
        return 2
    try:
        run_demo(opts)
    except DemoError as exc:
        print(f"fedmq: error: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_model_fetch(args: argparse.Namespace) -> int:
    from edge_agent.models import resolve_model

    path = resolve_model(args.name, cache_dir=Path(args.cache) if args.cache else None)
    print(path)
    return 0


def cmd_model_shrink(args: argparse.Namespace) -> int:
    import json

    from edge_agent.models import resolve_model, shrink_model
    from edge_agent.shrink import Recipe, read_manifest
    from fedmq.configfile import ConfigError

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    recipe = Recipe(blocks=args.blocks, layout=args.layout, steps=args.steps, lr=args.lr, seed=args.seed,
                    texts=args.texts, temperature=args.temperature)
    try:
        base = Path(resolve_model(args.name, cache_dir=Path(args.cache) if args.cache else None))
        if not base.is_dir():
            raise ValueError(f"{args.name!r} is not a local checkpoint")
        path = shrink_model(base, recipe, force=args.force)
    except ValueError as exc:
        raise ConfigError(f"fedmq model shrink {args.name}: {exc}") from None
    made = read_manifest(path) or {}
    print(json.dumps({k: made.get(k) for k in ("kept_blocks", "held_out_kl_before", "held_out_kl_after",
                                                "final_loss")}))
    print(path)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    import json

    from edge_agent.data import synthesize

    manifest = synthesize(
        Path(args.out), num_devices=args.devices, samples_per_device=args.samples,
        eval_samples=args.eval_samples, seed=args.seed,
    )
    print(json.dumps(manifest, indent=1))
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    import os

    from fedmq.configfile import ConfigError
    from fedmq_protocol.errors import ProtocolError
    from fedmq_protocol.signing import generate_keypair
    from fedmq_protocol.topics import check_level

    try:
        check_level(args.device_id, "device id")
    except ProtocolError as exc:
        raise ConfigError(str(exc)) from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = out / f"{args.device_id}.key", out / f"{args.device_id}.pub"
    for path in (key_path, pub_path):
        if path.exists() and not args.force:
            raise ConfigError(f"{path} exists (use --force to replace it)")
    pem, pub = generate_keypair()
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    os.chmod(key_path, 0o600)
    pub_path.write_text(pub + "\n")
    print(f"private key: {key_path}   (agent YAML: signing_key: {key_path})")
    print(f"public key:  {pub_path}")
    print("coordinator YAML:")
    print("device_keys:")
    print(f"  {args.device_id}: {pub}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedmq", description="Federated fine-tuning of LLMs over MQTT")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING (default INFO; WARNING for the demo)")
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser("agent", help="run an edge agent")
    a.add_argument("--config", required=True, help="agent YAML (see configs/agent.yaml)")
    a.set_defaults(func=cmd_agent)

    c = sub.add_parser("coordinator", help="run the coordinator")
    c.add_argument("--config", required=True, help="coordinator YAML (see configs/coordinator.yaml)")
    c.add_argument("--rounds", type=int, help="override the number of rounds")
    c.set_defaults(func=cmd_coordinator)

    ag = sub.add_parser("aggregator", help="run a site aggregator (partial aggregates of a site broker's devices)")
    ag.add_argument("--config", required=True, help="aggregator YAML (see configs/site.yaml)")
    ag.set_defaults(func=cmd_aggregator)

    ss = sub.add_parser("split-server", help="run the split server (the middle blocks of a split federation)")
    ss.add_argument("--config", required=True, help="split server YAML (see configs/split-server.yaml)")
    ss.set_defaults(func=cmd_split_server)

    sp = sub.add_parser("split-plan", help="the largest split cut (l_head, l_tail) a device's memory budget holds")
    sp.add_argument("--model", required=True, help="model name, HF directory or hub id (its config.json is read)")
    sp.add_argument("--memory-budget", required=True, help="the device's memory_budget: 1G, 800M or host_mb figure")
    sp.add_argument("--config", help="coordinator YAML: its split:, adapter: and fit: sections bound the cut")
    sp.add_argument("--l-head", type=int, help="largest l_head to consider (default: the split: section's, 2)")
    sp.add_argument("--l-tail", type=int, help="largest l_tail to consider (default: the split: section's, 2)")
    sp.add_argument("--batch-size", type=int, help="the round's batch size (default: the fit: section's)")
    sp.add_argument("--seq-len", type=int, help="tokens per sequence (default: the fit: section's max_seq_len)")
    sp.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    sp.set_defaults(func=cmd_split_plan)

    d = sub.add_parser("demo", help="broker + coordinator + agents on one machine")
    d.add_argument("--broker", help="mqtt://HOST:PORT of an existing broker (default: embedded amqtt)")
    d.add_argument("--agents", type=int, default=3)
    d.add_argument("--rounds", type=int, default=3)
    d.add_argument("--model", default="smollm2-135m", help="model name, HF directory, .gguf or hub id")
    d.add_argument("--method", choices=["lora", "qlora", "zo", "krso", "kd", "split"], default="qlora",
                   help="LoRA, QLoRA (4-bit base), zeroth-order FedKSeed (zo), FedKRSO (krso), distillation "
                   "over logits between models of two sizes (kd) or split learning with a split server (split) "
                   "(default qlora)")
    d.add_argument("--summary", help="write per-round figures as JSON here")
    d.add_argument("--workdir", default="fedmq-demo", help="data, configs, logs and state (default ./fedmq-demo)")
    d.add_argument("--local-steps", type=int, default=8)
    d.add_argument("--lr", type=float, help="learning rate (default 2e-3; 1e-5 for zo, 3e-4 for krso)")
    d.add_argument("--batch-size", type=int, default=4)
    d.add_argument("--mqtt-version", choices=["5", "3.1.1"],
                   help="MQTT protocol (default 3.1.1 on the embedded broker, 5 with --broker)")
    values = ["float32", "float16", "bfloat16", "int8", "int4", "int2", "sign"]  # fedmq_protocol.codec.ValueFormat
    d.add_argument("--uplink", choices=values, default="int4",
                   help="value format of updates, with error feedback (default int4; float32: dense fp32)")
    d.add_argument("--downlink", choices=values, default="int8",
                   help="value format of global differences (default int8 + zstd; float32: dense fp32, no zstd)")
    d.add_argument("--async", dest="asynchronous", action="store_true",
                   help="asynchronous FedBuff rounds (lora, qlora, krso): every device trains all the time, a "
                   "new global every agents - 1 updates; --rounds counts global versions")
    d.set_defaults(func=cmd_demo)

    mdl = sub.add_parser("model", help="model cache")
    msub = mdl.add_subparsers(dest="model_command", required=True)
    f = msub.add_parser("fetch", help="fetch/convert a model into the local cache and print its path")
    f.add_argument("name", help="smollm2-135m, tiny-llama, a .gguf file, an HF directory or hub id")
    f.add_argument("--cache", help="cache directory (default $FEDMQ_HOME or ~/.cache/fedmq)")
    f.set_defaults(func=cmd_model_fetch)
    sh = msub.add_parser("shrink", help="make a smaller model: keep N blocks of a cached model and heal "
                                        "them by distillation from it (cached as '<name>:shrunk=N')")
    sh.add_argument("name", help="the teacher: smollm2-135m, tiny-llama or an HF directory")
    sh.add_argument("--blocks", type=int, required=True, help="blocks the student keeps")
    sh.add_argument("--layout", choices=["spread", "first"], default="spread",
                    help="which blocks: evenly spaced, first and last kept (default), or the first N")
    sh.add_argument("--steps", type=int, default=64, help="healing steps (AdamW, batch 4; default 64)")
    sh.add_argument("--lr", type=float, default=5e-4)
    sh.add_argument("--texts", type=int, default=28,
                    help="texts the teacher writes for healing (default 28; 4 held out)")
    sh.add_argument("--temperature", type=float, default=2.0, help="distillation temperature (default 2)")
    sh.add_argument("--seed", type=int, default=0)
    sh.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    sh.add_argument("--force", action="store_true", help="rebuild a cached student made by another recipe")
    sh.add_argument("--cache", help="cache directory (default $FEDMQ_HOME or ~/.cache/fedmq)")
    sh.set_defaults(func=cmd_model_shrink)

    keys = sub.add_parser("keys", help="update-signing keys (Ed25519)")
    ksub = keys.add_subparsers(dest="keys_command", required=True)
    kg = ksub.add_parser("generate", help="write DEVICE.key (private, agent signing_key) and DEVICE.pub")
    kg.add_argument("--device-id", required=True, help="the device the key pair belongs to")
    kg.add_argument("--out", default=".", help="directory for DEVICE.key and DEVICE.pub (default .)")
    kg.add_argument("--force", action="store_true", help="replace existing files")
    kg.set_defaults(func=cmd_keys_generate)

    data = sub.add_parser("data", help="datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    s = dsub.add_parser("synth", help="write non-IID synthetic federated instruction data")
    s.add_argument("--out", default="fedmq-data")
    s.add_argument("--devices", type=int, default=3)
    s.add_argument("--samples", type=int, default=200, help="training examples per device")
    s.add_argument("--eval-samples", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data_synth)

    from fedmq import report, service, watch

    for ops in (service, watch, report):
        ops.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level or ("WARNING" if args.command == "demo" else "INFO"))
    from fedmq.configfile import ConfigError

    expected: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError)
    try:
        from fedmq_protocol.transport import TransportError

        expected += (TransportError,)
    except ImportError:  # pragma: no cover
        pass
    try:
        from edge_agent.data import DataError

        expected += (DataError,)
    except ImportError:  # the coordinator-only install has no agent extras
        pass
    try:
        return args.func(args)
    except expected as exc:
        print(f"fedmq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
