"""The defaults side by side with the previous out-of-the-box setting: bytes and eval loss per round.

(a) the defaults: uplink int4 + error feedback (``UplinkConfig()``), downlink int8 differences + zstd
with exact zstd-compressed float32 snapshots (``DownlinkConfig()``), the model's chat template
(``data.template: auto``); (b) the previous defaults: dense float32 both ways, no zstd, the plain
``### Instruction / ### Response`` template; (c) dense float32 with the chat template, so that the
template's effect (b vs c) and the codecs' (c vs a) can be told apart.

SmolLM2-135M-Instruct, LoRA r=8 on q_proj/v_proj (fp32 base), 3 clients with non-IID synthetic data,
the same seeds for every setting. The in-process harness of bench/compression.py (``run_setting``:
production trainer, uplink encoder with error feedback, real msgpack Update and GlobalModel messages
whose encoded sizes are the bytes reported, coordinator validation and aggregation, ServerModel
snapshot/difference downlink from v0's snapshot on, devices following through GlobalSync). Held-out
loss after every round under the chat template for every setting (what a user of an Instruct model
sees), and under each setting's own template.

    python bench/defaults.py --local-steps 3   # the recorded run: 3 rounds x 3 local steps (15 min on
                                               # 2 cores shared with other jobs); 5 steps by default
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.compression import federated_data, run_setting
from bench.report import command_line, machine, md_table, update_doc_section, write_json
from broker_coordinator.downlink import DownlinkConfig
from edge_agent.models import resolve_model
from edge_agent.uplink import UplinkConfig
from fedmq_protocol import messages as m

N_CLIENTS = 3
REF = "previous: dense fp32, plain"


def settings() -> list[dict]:
    fp32_up = UplinkConfig(values="float32")
    fp32_down = DownlinkConfig(values="float32", zstd=False)
    return [
        {"name": "defaults: int4+EF up, int8+zstd down, chat", "uplink": UplinkConfig(),
         "downlink": DownlinkConfig(), "template": "chat"},
        {"name": REF, "uplink": fp32_up, "downlink": fp32_down, "template": "plain"},
        {"name": "dense fp32, chat", "uplink": fp32_up, "downlink": fp32_down, "template": "chat"},
    ]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=96, help="room for the chat template's system turn")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--samples", type=int, default=40, help="training examples per client")
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    from edge_agent.methods import get_method

    t_start = time.perf_counter()
    model_path = resolve_model("smollm2-135m")
    adapter = m.AdapterSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    lora = get_method("lora")
    # one model per template, the same seeded LoRA init
    methods = {"chat": lora(model_path, adapter, device="cpu", dtype="float32", seed=0, template="auto"),
               "plain": lora(model_path, adapter, device="cpu", dtype="float32", seed=0, template="plain")}
    assert methods["chat"].template == "chat", "auto should resolve to the Instruct model's chat template"
    v0 = methods["chat"].get_adapter()
    assert all(np.array_equal(v0[k], methods["plain"].get_adapter()[k]) for k in v0)
    fit_base = m.FitConfig(local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
                           max_seq_len=args.max_seq_len)
    eval_cfg = fit_base.model_copy(update={"batch_size": 16})

    with tempfile.TemporaryDirectory(prefix="fedmq-bench-defaults-") as tmp_s:
        tmp = Path(tmp_s)
        train, evalset = federated_data(tmp, N_CLIENTS, args.samples, args.eval_samples)

        def evaluate(weights: dict, template: str) -> float:
            meth = methods[template]
            meth.set_adapter(weights)
            return float(meth.evaluate(evalset, eval_cfg)[0])

        round1: dict[str, dict[int, tuple[dict, int, float]]] = {}  # same global, seeds, template: same fit

        def local_fit(template: str, weights: dict, i: int, round_no: int) -> tuple[dict, int, float]:
            if round_no == 1 and i in round1.get(template, {}):
                return round1[template][i]
            meth = methods[template]
            meth.set_adapter(weights)
            # the coordinator's seed rule: fit.seed + round * 7919 + attempt
            res = meth.fit(train[i], fit_base.model_copy(update={"seed": round_no * 7919}))
            local = meth.get_adapter()
            out = {k: local[k] - weights[k] for k in weights}, res.num_samples, res.train_loss
            if round_no == 1:
                round1.setdefault(template, {})[i] = out
            return out

        t0 = time.perf_counter()
        baseline = {t: evaluate(v0, t) for t in ("chat", "plain")}
        print(f"baseline eval loss chat {baseline['chat']:.4f}, plain {baseline['plain']:.4f} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)

        results = []
        for st in settings():
            t_set = time.perf_counter()
            tpl = st["template"]
            chat_loss: list[float] = []
            own_loss: list[float] = []

            def after_round(r: int, published: dict, tpl: str = tpl, chat_loss: list = chat_loss,
                            own_loss: list = own_loss) -> None:
                chat_loss.append(evaluate(published, "chat"))
                own_loss.append(chat_loss[-1] if tpl == "chat" else evaluate(published, tpl))
                print(f"  round {r}: eval chat {chat_loss[-1]:.4f}, own ({tpl}) {own_loss[-1]:.4f}", flush=True)

            run = run_setting(v0, adapter, st["uplink"], None, st["downlink"], args.rounds, N_CLIENTS,
                              lambda w, i, r, tpl=tpl: local_fit(tpl, w, i, r),
                              tmp / st["name"].replace(" ", "_").replace(":", "").replace(",", ""), after_round)
            up = [float(np.mean(rnd)) for rnd in run["uplink_bytes"]]
            down_total = run["v0_snapshot_bytes"] + sum(run["downlink_bytes"])
            res = {
                "name": st["name"], "template": tpl,
                "uplink": st["uplink"].model_dump(), "downlink": st["downlink"].model_dump(),
                "uplink_bytes_per_round": up,
                "uplink_bytes_per_round_per_client": float(np.mean(up)),
                "v0_snapshot_bytes": run["v0_snapshot_bytes"],
                "downlink_bytes_per_round": run["downlink_bytes"],
                # per client: every device receives each retained global once, v0's snapshot included
                "downlink_bytes_per_round_per_client": down_total / args.rounds,
                "downlink_bytes_per_round_per_client_excl_v0": float(np.mean(run["downlink_bytes"])),
                "eval_loss_chat": chat_loss, "eval_loss_own_template": own_loss,
                "train_loss_per_round": [float(np.mean(run["train_losses"][j * N_CLIENTS:(j + 1) * N_CLIENTS]))
                                         for j in range(args.rounds)],
                "seconds": time.perf_counter() - t_set,
            }
            results.append(res)
            print(f"{st['name']:44s} up {res['uplink_bytes_per_round_per_client']:10.0f} B  down "
                  f"{res['downlink_bytes_per_round_per_client']:10.0f} B  eval chat {chat_loss[-1]:.4f}  "
                  f"({res['seconds']:.0f}s)", flush=True)
    report(args, baseline, results, time.perf_counter() - t_start)
    return 0


def report(args: argparse.Namespace, baseline: dict, results: list[dict], seconds: float) -> None:
    ref = next(r for r in results if r["name"] == REF)
    for r in results:
        r["uplink_reduction_x"] = ref["uplink_bytes_per_round_per_client"] / r["uplink_bytes_per_round_per_client"]
        r["downlink_reduction_x"] = (ref["downlink_bytes_per_round_per_client"]
                                     / r["downlink_bytes_per_round_per_client"])
        both = {k: x["uplink_bytes_per_round_per_client"] + x["downlink_bytes_per_round_per_client"]
                for k, x in (("ref", ref), ("r", r))}
        r["total_reduction_x"] = both["ref"] / both["r"]
        r["final_eval_loss_chat_vs_ref_pct"] = 100 * (r["eval_loss_chat"][-1] / ref["eval_loss_chat"][-1] - 1)
    out = {"benchmark": "defaults", "command": command_line(), "machine": machine(), "args": vars(args),
           "seconds": seconds, "baseline_eval_loss": baseline, "reference": REF, "results": results}
    path = write_json("defaults", out)

    rows = [[r["name"], f"{r['uplink_bytes_per_round_per_client']:,.0f}", f"{r['uplink_reduction_x']:.1f}×",
             f"{r['downlink_bytes_per_round_per_client']:,.0f}", f"{r['downlink_reduction_x']:.1f}×",
             " → ".join(f"{x:.4f}" for x in [baseline["chat"], *r["eval_loss_chat"]]),
             f"{r['final_eval_loss_chat_vs_ref_pct']:+.2f} %",
             " → ".join(f"{x:.4f}" for x in [baseline[r["template"]], *r["eval_loss_own_template"]])]
            for r in results]
    d = results[0]
    md = (
        "## Defaults vs the previous out-of-the-box setting (`bench/defaults.py`)\n\n"
        f"`{out['command']}` ({seconds / 60:.1f} min) — SmolLM2-135M-Instruct, LoRA r=8 on q_proj/v_proj (fp32 base), "
        f"{N_CLIENTS} clients with non-IID synthetic data ({args.samples} examples each), {args.rounds} rounds × "
        f"{args.local_steps} local AdamW steps (batch {args.batch_size}, ≤{args.max_seq_len} tokens, lr {args.lr}), "
        f"FedAvg, the same seeds for every setting; loss on {args.eval_samples} held-out examples. "
        f"{out['machine']['cores']} cores, {out['machine']['date']}, commit {out['machine']['commit']}.\n\n"
        "Settings: the defaults (uplink `UplinkConfig()`: dense int4 with error feedback; downlink "
        "`DownlinkConfig()`: int8 differences + zstd with server-side error feedback, snapshots exact float32 + "
        "zstd; `data.template: auto`, the model's chat template), the previous defaults (dense float32 both "
        "ways, no zstd, the plain `### Instruction / ### Response` template) and dense float32 with the chat "
        "template (plain vs chat at fp32: the template's effect; chat fp32 vs defaults: the codecs'). "
        "In-process harness of `bench/compression.py` (`run_setting`); bytes are the encoded msgpack "
        "`Update` / `GlobalModel` payloads (before chunking). Downlink per client per round: v0's snapshot plus "
        f"rounds 1..{args.rounds}'s globals, divided by {args.rounds} (each device receives every retained global "
        "once); every device's reconstruction was checked bitwise against the coordinator's. Eval loss: "
        "before training → after each round, under the chat template for every setting (what a user of the "
        "Instruct model gets), and under the setting's own template (plain's loss is on different tokens: "
        "compare it only with itself).\n\n"
        + md_table(["setting", "uplink B/round/client", "vs previous", "downlink B/round/client", "vs previous",
                    "eval loss, chat template", "final vs previous", "eval loss, own template"], rows)
        + f"\n\nDefaults vs previous: {d['uplink_reduction_x']:.1f}× fewer uplink bytes, "
        f"{d['downlink_reduction_x']:.1f}× fewer downlink bytes ({d['total_reduction_x']:.1f}× both ways together); "
        f"v0 snapshot {d['v0_snapshot_bytes']:,} B (defaults) vs {ref['v0_snapshot_bytes']:,} B (previous). "
        "Downlink per round without v0's snapshot: "
        + "; ".join(f"{r['name']}: {r['downlink_bytes_per_round_per_client_excl_v0']:,.0f} B" for r in results)
        + ".\n"
    )
    if not args.no_doc:
        update_doc_section("defaults", md)
    print(md)
    print(f"results: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
