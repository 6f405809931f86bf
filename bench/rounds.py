"""Round anatomy on a real broker: local training time vs protocol time, bytes per round.

SmolLM2-135M-Instruct, N agents (separate processes), QLoRA on NF4, R rounds, a local Mosquitto.
Protocol time of a round is the critical path of everything that is not training or waiting for
a slower device: update encode + transfer (publish, broker, reassembly) + decode, aggregation, and
the global's encode/publish/transfer + decode + apply on the device. Training time is the slowest
participant's local training time.

    python bench/rounds.py --rounds 3 --agents 3 --local-steps 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, machine, md_table, update_doc_section, write_json
from edge_agent.data import synthesize
from edge_agent.models import resolve_model
from tests.federation import agent_config, coordinator_config, spawn, stop_all
from tests.mosquitto import MosquittoBroker, find_mosquitto

PROTOCOL_KEYS = ("update_encode_s", "update_transfer_s", "update_decode_s", "aggregate_s",
                 "global_receive_s", "global_decode_s", "global_apply_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--method", default="qlora", choices=["lora", "qlora"])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--local-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    args = ap.parse_args()

    exe = find_mosquitto()
    if exe is None:
        sys.exit("mosquitto is not installed (apt-get install mosquitto)")
    model_path = resolve_model(args.model)
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-rounds-") as tmp_s:
        tmp = Path(tmp_s)
        broker = MosquittoBroker(tmp / "broker", exe=exe).start()
        data = tmp / "data"
        synthesize(data, num_devices=args.agents, samples_per_device=120, eval_samples=32, seed=0)
        fit = {"local_steps": args.local_steps, "lr": 2e-3, "batch_size": args.batch_size,
               "max_seq_len": args.max_seq_len}
        threads = {"torch_threads": 1}
        procs = [spawn(["agent", "--config", str(agent_config(tmp, i, broker.url, data, model=model_path,
                                                               method=args.method, training=threads))],
                       tmp / f"agent-{i}.log") for i in range(args.agents)]
        try:
            cfg = coordinator_config(tmp, broker.url, rounds=args.rounds, min_clients=args.agents, fit=fit,
                                     adapter={"r": args.lora_r, "alpha": 2 * args.lora_r},
                                     evaluate=True, round_deadline_s=3600)
            coord = spawn(["coordinator", "--config", str(cfg)], tmp / "coordinator.log")
            if coord.wait(timeout=3600) != 0:
                sys.exit("coordinator failed:\n" + (tmp / "coordinator.log").read_text()[-3000:])
        finally:
            stop_all(procs)
            broker.stop()
        state = json.loads((tmp / "coordinator" / "state.json").read_text())

    rounds = []
    for h in state["history"]:
        if h["round"] == 0:
            continue
        t = h["timings"]
        protocol = sum(t.get(k, 0.0) for k in PROTOCOL_KEYS)
        rounds.append({
            "round": h["round"],
            "participants": len(h["participants"]),
            "train_s": t["train_s"],
            "protocol_s": protocol,
            "protocol_over_train": protocol / t["train_s"],
            "breakdown_s": {k: t.get(k, 0.0) for k in PROTOCOL_KEYS},
            "uplink_bytes": h["uplink_bytes"],
            "downlink_bytes": h["downlink_bytes"],
            "eval_loss": h["eval_loss"],
        })
    result = {"benchmark": "rounds", "command": command_line(), "machine": machine(), "args": vars(args),
              "baseline_eval_loss": state["history"][0]["eval_loss"], "rounds": rounds,
              "max_protocol_over_train": max(r["protocol_over_train"] for r in rounds),
              "target_protocol_over_train": 0.02}
    path = write_json("rounds", result)

    rows = [[r["round"], r["participants"], f"{r['train_s']:.2f}", f"{r['protocol_s'] * 1000:.1f}",
             f"{100 * r['protocol_over_train']:.2f} %", f"{r['uplink_bytes'] / 1e6:.2f}",
             f"{r['downlink_bytes'] / 1e6:.2f}", f"{r['eval_loss']:.4f}"] for r in rounds]
    worst = max(rounds, key=lambda r: r["protocol_over_train"])
    breakdown = ", ".join(f"{k.removesuffix('_s')} {v * 1000:.1f} ms" for k, v in worst["breakdown_s"].items())
    md = (
        f"## Rounds: training time vs protocol time (`bench/rounds.py`)\n\n"
        f"`{result['command']}` — {args.model}, {args.agents} agents as processes, {args.method}, "
        f"LoRA r={args.lora_r} on q_proj/v_proj, {args.local_steps} local steps of batch {args.batch_size} × "
        f"≤{args.max_seq_len} tokens, local Mosquitto; {machine()['cores']} cores shared by all agents, "
        f"{result['machine']['date']}, commit {result['machine']['commit']}.\n\n"
        + md_table(["round", "participants", "train s (slowest)", "protocol ms", "protocol / train",
                    "uplink MB", "downlink MB", "eval loss"], rows)
        + f"\n\nBaseline eval loss {result['baseline_eval_loss']:.4f}. Target protocol ≤ 2 % of training: "
        f"worst round {100 * result['max_protocol_over_train']:.2f} % "
        f"({'met' if result['max_protocol_over_train'] <= 0.02 else 'NOT met'}). Worst round's protocol "
        f"breakdown: {breakdown}.\n"
    )
    if not args.no_doc:
        update_doc_section("rounds", md)
    print(md)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
