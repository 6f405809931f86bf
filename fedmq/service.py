"""systemd units for the agent, the coordinator and the split server, and ``fedmq service install``.

The units are rendered here (``systemd/*.service`` in the repository are these renderings with the
defaults, kept identical by a test). ``install`` validates the YAML, rewrites the paths a sandboxed
service can use (state in its ``StateDirectory``, secrets through ``LoadCredential``), and writes
``/etc/fedmq/{kind}.yaml`` and ``/etc/systemd/system/fedmq-{kind}.service`` under ``--root``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from edge_agent.memory.budget import parse_size
from fedmq.configfile import ConfigError, load_config

if TYPE_CHECKING:
    from pydantic import BaseModel

KINDS = ("agent", "coordinator", "split-server")
DEFAULT_EXEC = "/usr/local/bin/fedmq"

# Default memory caps when neither --memory-max nor the config's memory_budget says otherwise:
# a share of physical RAM (systemd resolves the percentage on the device).
DEFAULT_MEMORY_MAX = {"agent": "80%", "coordinator": "50%", "split-server": "80%"}
# The agent's watchdog must outlast one training step (progress is reported after each step);
# a coordinator pumps its event queue at least every 0.5 s; a split server between two requests
# (one request: the middle blocks' forward or backward of one batch).
DEFAULT_WATCHDOG_S = {"agent": 600, "coordinator": 120, "split-server": 300}
WHAT = {"agent": "edge agent", "coordinator": "coordinator", "split-server": "split server"}


def parse_memory(value: Any, *, what: str = "memory") -> str:
    """A systemd ``MemoryMax=`` value from ``6G``/``6GB``/``6GiB``/``512M``/``80%`` or a number of MB
    (read as the agent reads ``memory_budget``: ``edge_agent.memory.budget.parse_size``)."""
    try:
        size = parse_size(value, what=what, example="6G")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if size.number.is_integer():
        return f"{int(size.number)}{size.unit}"
    if size.is_share:
        return f"{size.number}%"
    # systemd wants integers: express fractions in the next smaller unit
    smaller = {"T": "G", "G": "M", "M": "K", "K": ""}[size.unit]
    return f"{int(size.number * 1024)}{smaller}"


def memory_budget_from(raw: dict[str, Any]) -> str | None:
    """The host figure of an agent YAML's ``memory_budget`` (a size, or a map with ``host_mb`` /
    ``host`` / ``ram`` / ``total``), if present: the unit's cap equals what the agent plans for."""
    budget = raw.get("memory_budget")
    if budget is None:
        return None
    if isinstance(budget, dict):
        for key in ("host_mb", "host", "ram", "total", "max"):
            if budget.get(key) is not None:
                return parse_memory(budget[key], what=f"memory_budget.{key}")
        return None
    return parse_memory(budget, what="memory_budget")


@dataclass(frozen=True)
class UnitOptions:
    kind: str
    exec_start: str = DEFAULT_EXEC  # the fedmq command (may be "PYTHON -m fedmq")
    config_path: str = "/etc/fedmq/{kind}.yaml"
    memory_max: str | None = None
    watchdog_s: int | None = None
    user: str | None = None  # None: DynamicUser
    credentials: tuple[tuple[str, str], ...] = ()  # (name, source path) for LoadCredential=

    @property
    def config(self) -> str:
        return self.config_path.format(kind=self.kind)


def render_unit(o: UnitOptions) -> str:
    if o.kind not in KINDS:
        raise ValueError(f"unknown service kind {o.kind!r}; expected one of {KINDS}")
    agent = o.kind == "agent"
    model = o.kind in ("agent", "split-server")  # loads a model: its cache, the GPU, a long first start
    memory = o.memory_max or DEFAULT_MEMORY_MAX[o.kind]
    watchdog = o.watchdog_s or DEFAULT_WATCHDOG_S[o.kind]
    what = WHAT[o.kind]
    lines = [
        f"# fedmq {what}. Written by `fedmq service install {o.kind} --config FILE`;",
        f"# its configuration is {o.config}. Logs: journalctl -u fedmq-{o.kind}",
        "[Unit]",
        f"Description=fedmq {what} (federated fine-tuning over MQTT)",
        "After=network-online.target",
        "Wants=network-online.target",
        # at most 5 failed starts in 30 minutes, then systemd stops trying (systemctl reset-failed)
        "StartLimitIntervalSec=30min",
        "StartLimitBurst=5",
        "",
        "[Service]",
        # READY=1 once connected (and, for the agent, its model resolved); WATCHDOG=1 while the work
        # loop makes progress, so a hung process is killed and restarted
        "Type=notify",
        "NotifyAccess=main",
        f"ExecStart={o.exec_start} {o.kind} --config {o.config}",
        "Restart=on-failure",
        "RestartSec=15s",
        f"WatchdogSec={watchdog}s",
        # first start of an agent may fetch and convert its model
        f"TimeoutStartSec={'30min' if model else '2min'}",
        # SIGTERM: the current step finishes or is abandoned, then the offline status is published
        f"TimeoutStopSec={'3min' if agent else '1min'}",
        "KillSignal=SIGTERM",
    ]
    if o.user:
        lines.append(f"User={o.user}")
    else:
        lines.append("DynamicUser=yes")
    lines += [
        f"StateDirectory=fedmq-{o.kind}",
        "StateDirectoryMode=0700",
        "ConfigurationDirectory=fedmq",
    ]
    if model:
        lines += ["CacheDirectory=fedmq", "Environment=FEDMQ_HOME=/var/cache/fedmq"]
    lines += ["Environment=PYTHONUNBUFFERED=1"]
    for name, source in o.credentials:
        lines.append(f"LoadCredential={name}:{source}")
    lines += [
        # the memory cap matches the agent's memory budget (--memory-max or memory_budget in the YAML)
        f"MemoryMax={memory}",
        "MemorySwapMax=0",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
        "PrivateTmp=yes",
        # the agent needs the GPU device nodes (/dev/nvidia*, Jetson /dev/nvhost-*)
        f"PrivateDevices={'no' if model else 'yes'}",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "SystemCallArchitectures=native",
        "CapabilityBoundingSet=",
        "UMask=0077",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def default_exec() -> str:
    exe = shutil.which("fedmq")
    if exe:
        return exe
    return f"{shlex.quote(sys.executable)} -m fedmq"


@dataclass
class InstallResult:
    unit_path: Path
    config_path: Path
    unit: str
    config: dict[str, Any]
    notes: list[str]


def install(
    kind: str,
    config_file: str | Path,
    *,
    root: str | Path = "/",
    exec_start: str | None = None,
    memory_max: str | None = None,
    watchdog_s: int | None = None,
    user: str | None = None,
) -> InstallResult:
    """Validate ``config_file`` and write the unit and the (rewritten) config under ``root``."""
    if kind not in KINDS:
        raise ConfigError(f"unknown service kind {kind!r}; expected one of {', '.join(KINDS)}")
    model: type[BaseModel]
    if kind == "agent":
        from edge_agent.config import AgentConfig

        model = AgentConfig
    elif kind == "split-server":
        from split_server.config import SplitServerConfig

        model = SplitServerConfig
    else:
        from broker_coordinator.config import CoordinatorConfig

        model = CoordinatorConfig
    src = Path(config_file)
    raw_text = src.read_text() if src.is_file() else ""
    raw = yaml.safe_load(raw_text) if raw_text else None
    budget = memory_budget_from(raw) if isinstance(raw, dict) and kind == "agent" else None
    load_config(src, model)  # refuse to install a config the service would reject
    assert isinstance(raw, dict)
    notes: list[str] = []
    unit_name = f"fedmq-{kind}.service"
    cred_dir = f"/run/credentials/{unit_name}"
    config = dict(raw)

    state_dir = f"/var/lib/fedmq-{kind}"
    if str(config.get("state_dir", "")) != state_dir:
        notes.append(f"state_dir set to {state_dir} (the unit's StateDirectory; the service can write nowhere else)")
        config["state_dir"] = state_dir
    credentials: list[tuple[str, str]] = []
    broker = dict(config.get("broker") or {})
    for key, name in (("password_file", "broker-password"), ("key_file", "broker-key")):
        if broker.get(key):
            source = str(Path(os.path.expanduser(str(broker[key]))).resolve())
            credentials.append((name, source))
            broker[key] = f"{cred_dir}/{name}"
            notes.append(f"broker.{key} is passed as systemd credential {name!r} from {source} (may stay root-only)")
    if broker:
        config["broker"] = broker
    if memory_max is not None:
        memory = parse_memory(memory_max, what="--memory-max")
    elif budget is not None:
        memory = budget
        notes.append(f"MemoryMax={budget} from memory_budget in {src}")
    else:
        memory = None

    opts = UnitOptions(
        kind=kind, exec_start=exec_start or default_exec(), memory_max=memory, watchdog_s=watchdog_s,
        user=user, credentials=tuple(credentials),
    )
    unit = render_unit(opts)
    base = Path(root)
    unit_path = base / "etc/systemd/system" / unit_name
    config_path = base / opts.config.lstrip("/")
    unit_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.parent.mkdir(parents=True, exist_ok=True)
    unit_path.write_text(unit)
    header = f"# installed by `fedmq service install {kind}` from {src.resolve()}\n"
    config_path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    os.chmod(config_path, 0o644)
    if user is None:
        for key in ("train", "eval"):
            p = (config.get("data") or {}).get(key) if kind == "agent" else None
            if p and not (os.stat(p).st_mode & 0o004):
                notes.append(f"data.{key} {p} is not world-readable: the DynamicUser service cannot read it "
                             "(chmod o+r, or install with --user NAME)")
    return InstallResult(unit_path, config_path, unit, config, notes)


def cmd_service_install(args) -> int:
    res = install(
        args.kind, args.config, root=args.root, exec_start=args.exec_start, memory_max=args.memory_max,
        watchdog_s=args.watchdog_sec, user=args.user,
    )
    print(f"wrote {res.unit_path}")
    print(f"wrote {res.config_path}")
    for note in res.notes:
        print(f"note: {note}")
    if Path(args.root).resolve() == Path("/"):
        print(f"next: systemctl daemon-reload && systemctl enable --now fedmq-{args.kind}")
    return 0


def add_parser(sub) -> None:
    svc = sub.add_parser("service", help="systemd units")
    ssub = svc.add_subparsers(dest="service_command", required=True)
    i = ssub.add_parser("install", help="write the systemd unit and config of an agent, the coordinator or "
                        "the split server")
    i.add_argument("kind", choices=KINDS)
    i.add_argument("--config", required=True, help="the YAML to install (validated first)")
    i.add_argument("--root", default="/", help="install under this directory instead of / (tests, images)")
    i.add_argument("--memory-max", help="MemoryMax= of the unit, e.g. 6G or 80%% (default: the config's "
                   "memory_budget, else 80%% of RAM for the agent, 50%% for the coordinator)")
    i.add_argument("--watchdog-sec", type=int, help="WatchdogSec= (default 600 agent, 120 coordinator, 300 "
                   "split server): "
                   "longer than one training step")
    i.add_argument("--user", help="run as this existing system user instead of a DynamicUser")
    i.add_argument("--exec", dest="exec_start", help="the fedmq command in ExecStart (default: fedmq on PATH, "
                   "else this Python with -m fedmq)")
    i.set_defaults(func=cmd_service_install)
