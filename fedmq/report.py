"""``fedmq report``: plots and a markdown summary of a run.

Sources: a topic log recorded by ``fedmq watch --record FILE`` (JSON lines ``{"ts", "topic",
"payload"}``) or a coordinator state directory (its ``state.json`` holds every round summary).
Writes ``eval_loss.png`` (federated eval loss per round), ``bytes.png`` (uplink and downlink bytes
per round per device) and ``report.md`` into ``--out``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmq.configfile import ConfigError
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError


@dataclass
class RunRecord:
    source: str
    rounds: list[m.RoundSummary]
    devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # last status per device
    federation: str | None = None


def load_log(path: Path) -> RunRecord:
    """Round summaries (last copy of each round wins) and device statuses from a recorded log."""
    if not path.is_file():
        raise ConfigError(f"topic log not found: {path}")
    rounds: dict[int, m.RoundSummary] = {}
    devices: dict[str, dict[str, Any]] = {}
    federation = None
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            topic, payload = rec["topic"], rec["payload"]
            if topic.endswith("/coordinator/rounds"):
                s = m.RoundSummary.from_obj(payload)
                rounds[s.round] = s
                federation = topic.rsplit("/coordinator/rounds", 1)[0]
            elif topic.endswith("/status") and "/devices/" in topic:
                st = m.DeviceStatus.from_obj(payload)
                if st.online or st.device_id not in devices:
                    devices[st.device_id] = st.model_dump(mode="json", exclude_none=True)
        except (ValueError, KeyError, TypeError, ProtocolError) as exc:
            raise ConfigError(f"{path}: line {lineno}: not a recorded fedmq message ({exc})") from None
    return RunRecord(str(path), [rounds[r] for r in sorted(rounds)], devices, federation)


def load_state(directory: Path) -> RunRecord:
    """Round history and known devices from a coordinator state directory."""
    state = directory / "state.json"
    if not state.is_file():
        raise ConfigError(f"no state.json in {directory} (is it the coordinator's state_dir?)")
    try:
        obj = json.loads(state.read_text())
        rounds = [m.RoundSummary.from_obj(h) for h in obj.get("history", [])]
    except (ValueError, ProtocolError) as exc:
        raise ConfigError(f"{state}: unreadable ({exc})") from None
    devices = {k: v for k, v in (obj.get("devices") or {}).items() if isinstance(v, dict)}
    return RunRecord(str(state), sorted(rounds, key=lambda s: s.round), devices)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


def per_device_bytes(s: m.RoundSummary) -> tuple[dict[str, int], dict[str, int]]:
    """(uplink, downlink) bytes of a round per device; summaries without the maps give totals."""
    up = dict(s.uplink_bytes_by_device) or ({"all devices": s.uplink_bytes} if s.uplink_bytes else {})
    down = dict(s.downlink_bytes_by_device) or ({"all devices": s.downlink_bytes} if s.downlink_bytes else {})
    return up, down


def plot_eval_loss(run: RunRecord, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(s.round, s.eval_loss) for s in run.rounds if s.eval_loss is not None]
    train = [(s.round, s.train_loss) for s in run.rounds if s.train_loss is not None]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    if pts:
        ax.plot([r for r, _ in pts], [v for _, v in pts], "o-", color="tab:blue", label="eval loss (global, held-out)")
    if train:
        ax.plot([r for r, _ in train], [v for _, v in train], "s--", color="tab:orange", alpha=0.7,
                label="train loss (devices, sample-weighted)")
    ax.set_xlabel("round (0 = initial global)")
    ax.set_ylabel("loss")
    ax.set_title("Loss per round")
    ax.set_xticks([s.round for s in run.rounds])
    ax.grid(alpha=0.3)
    if pts or train:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "eval_loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bytes(run: RunRecord, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rounds = [s.round for s in run.rounds]
    ups, downs = zip(*(per_device_bytes(s) for s in run.rounds), strict=True) if run.rounds else ((), ())
    devices = sorted({d for per in (*ups, *downs) for d in per})
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100, sharey=False)
    x = np.arange(len(rounds))
    width = 0.8 / max(1, len(devices))
    for ax, per_round, title in ((axes[0], ups, "uplink (device → coordinator)"),
                                 (axes[1], downs, "downlink (coordinator → device)")):
        for i, dev in enumerate(devices):
            vals = [per.get(dev, 0) / 1e6 for per in per_round]
            ax.bar(x - 0.4 + width * (i + 0.5), vals, width, label=dev)
        ax.set_xticks(x, [str(r) for r in rounds])
        ax.set_xlabel("round")
        ax.set_ylabel("MB")
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    if devices:
        axes[1].legend(fontsize=8, title="device", title_fontsize=8)
    fig.suptitle("Bytes per round per device", fontsize=11)
    fig.tight_layout()
    path = out / "bytes.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def markdown(run: RunRecord, images: list[Path]) -> str:
    source = f"Source: `{run.source}`" + (f" (topics `{run.federation}/...`)" if run.federation else "")
    lines = ["# fedmq run report", "", source, ""]
    if not run.rounds:
        return "\n".join([*lines, "No round summaries were found.", ""])
    evals = [s for s in run.rounds if s.eval_loss is not None]
    if len(evals) >= 2:
        a, b = evals[0], evals[-1]
        first, last = float(a.eval_loss or 0.0), float(b.eval_loss or 0.0)
        lines.append(f"Eval loss {first:.4f} (round {a.round}) → {last:.4f} (round {b.round}), "
                     f"{(last - first) / first * 100:+.1f}%.")
    total_up = sum(s.uplink_bytes for s in run.rounds)
    total_down = sum(s.downlink_bytes for s in run.rounds)
    lines += [f"{len(run.rounds)} rounds; uplink {_human(total_up)}, downlink {_human(total_down)} in total.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in images] + [""]
    lines += ["| round | global | participants | stragglers | train loss | eval loss | uplink | downlink | time |",
              "|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for s in run.rounds:
        participants = ", ".join(s.participants) or "-"
        stragglers = ", ".join(s.stragglers) or "-"
        train_loss = "" if s.train_loss is None else f"{s.train_loss:.4f}"
        eval_loss = "" if s.eval_loss is None else f"{s.eval_loss:.4f}"
        lines.append(
            f"| {s.round} | v{s.global_version} | {participants} | {stragglers} | {train_loss} | {eval_loss} | "
            f"{_human(s.uplink_bytes)} | {_human(s.downlink_bytes)} | {s.duration_s:.1f} s |"
        )
    per_dev: dict[str, list[int]] = {}
    for s in run.rounds:
        up, down = per_device_bytes(s)
        for d, n in up.items():
            per_dev.setdefault(d, [0, 0, 0])[0] += n
        for d, n in down.items():
            per_dev.setdefault(d, [0, 0, 0])[1] += n
        for d in s.participants:
            per_dev.setdefault(d, [0, 0, 0])[2] += 1
    lines += ["", "| device | method | rounds trained | uplink | downlink |", "|---|---|---:|---:|---:|"]
    for d in sorted(per_dev):
        sent, received, trained = per_dev[d]
        method = run.devices.get(d, {}).get("method") or ""
        lines.append(f"| {d} | {method} | {trained} | {_human(sent)} | {_human(received)} |")
    return "\n".join(lines) + "\n"


def make_report(run: RunRecord, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    images = [plot_eval_loss(run, out), plot_bytes(run, out)]
    md = out / "report.md"
    md.write_text(markdown(run, images), encoding="utf-8")
    return [*images, md]


def cmd_report(args) -> int:
    run = load_log(Path(args.log)) if args.log else load_state(Path(args.state))
    for p in make_report(run, Path(args.out)):
        print(f"wrote {p}")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="PNG plots and a markdown summary of a run")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--log", help="a topic log written by `fedmq watch --record FILE`")
    src.add_argument("--state", help="the coordinator's state_dir (reads state.json)")
    r.add_argument("--out", required=True, help="directory for eval_loss.png, bytes.png and report.md")
    r.set_defaults(func=cmd_report)
