"""Communication-efficient updates: uplink/downlink bytes per round vs final held-out eval loss.

SmolLM2-135M-Instruct, LoRA r=8 on q_proj/v_proj (fp32 base), 4 clients with non-IID synthetic
data (edge_agent.data.synthesize), the same seeds and rounds for every setting.

In-process harness (4 agent processes over a broker for ~10 settings would take hours on 2 cores):
the 4 clients run in sequence on one model instance, swapping adapters, but every step is the
production code: the real training method (edge_agent.methods), the agent's uplink encoder with its
persisted error feedback and byte budget (edge_agent.uplink), real msgpack ``Update`` and
``GlobalModel`` messages (their encoded sizes are the bytes reported), the coordinator's
validation/decoding and sparse aggregation (broker_coordinator.strategy) and its server model with
snapshot/difference downlink (broker_coordinator.downlink), and devices reconstructing the global
with fedmq_protocol.globals. Round 1 starts every setting from the same global with the same seeds,
so its local training is computed once and reused (identical by construction).

    python bench/compression.py            # 5 rounds x 2 local steps, every setting (~45 min on 2 cores)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.report import command_line, machine, md_table, update_doc_section, write_json
from broker_coordinator.downlink import DownlinkConfig, ServerModel, ServerOptimizerConfig
from broker_coordinator.strategy import mean_delta, validate_update_tensors
from edge_agent.data import load_jsonl, synthesize
from edge_agent.models import resolve_model
from edge_agent.uplink import METRIC_KEYS, UplinkConfig, UplinkEncoder
from fedmq_protocol import messages as m
from fedmq_protocol.codec import CodecSpec, encode
from fedmq_protocol.globals import GlobalSync

N_CLIENTS = 4


def settings(dense_bytes: int) -> list[dict]:
    """Every setting: uplink (agent ``uplink:``), optional byte budget, downlink (coordinator
    ``downlink:``), and ``freeze_a`` (FFA-LoRA: only lora_B trains, so only B's difference travels)."""
    # explicit formats: the configs' defaults changed after these results (int4 up, int8+zstd down)
    lossy_down = {"values": "int8", "zstd": True}
    fp32_down = {"values": "float32", "zstd": False}
    fp32_up = {"values": "float32"}
    # most telling first: report() after each setting keeps a partial run useful
    s = [
        {"name": "dense fp32", "uplink": fp32_up, "downlink": fp32_down},
        {"name": "dense sign +EF", "uplink": {"values": "sign", "zstd": True}, "downlink": lossy_down},
        {"name": "dense int2 +EF", "uplink": {"values": "int2", "zstd": True}, "downlink": lossy_down},
        {"name": "frozen-A sign +EF", "uplink": {"values": "sign", "zstd": True}, "downlink": lossy_down,
         "freeze_a": True},
        {"name": "top-10% int8 +EF", "uplink": {"values": "int8", "density": 0.10, "zstd": True},
         "downlink": lossy_down},
        {"name": "dense int4 +EF", "uplink": {"values": "int4", "zstd": True}, "downlink": lossy_down},
        {"name": "budget dense/50 +EF", "uplink": {"zstd": True}, "budget": dense_bytes // 50, "downlink": lossy_down},
        {"name": "dense fp16", "uplink": {"values": "float16"}, "downlink": {"values": "float16", "zstd": False}},
        {"name": "top-10% int8 no EF",
         "uplink": {"values": "int8", "density": 0.10, "zstd": True, "error_feedback": False},
         "downlink": lossy_down},
        {"name": "top-25% int8 +EF", "uplink": {"values": "int8", "density": 0.25, "zstd": True},
         "downlink": lossy_down},
        {"name": "top-10% fp16 +EF", "uplink": {"values": "float16", "density": 0.10, "zstd": True},
         "downlink": lossy_down},
        {"name": "frozen-A int4 +EF", "uplink": {"values": "int4", "zstd": True}, "downlink": lossy_down,
         "freeze_a": True},
        {"name": "frozen-A dense fp32", "uplink": fp32_up, "downlink": fp32_down, "freeze_a": True},
        {"name": "top-3% int8 +EF", "uplink": {"values": "int8", "density": 0.03, "zstd": True},
         "downlink": lossy_down},
        {"name": "frozen-A budget dense/100 +EF", "uplink": {"zstd": True}, "budget": dense_bytes // 100,
         "downlink": lossy_down, "freeze_a": True},
    ]
    return s


def update_msg(i: int, n: int, metrics: dict, enc) -> m.Update:
    """Client ``i``'s fit Update carrying the encoded tensors ``enc`` (its msgpack size is the uplink bytes)."""
    return m.Update(kind="fit", task_id="r-fit-v-a0", round=1, device_id=f"dev-{i}", base_version=0,
                    num_samples=n, metrics=metrics, tensors=enc)


def probe_metrics() -> dict:
    """The metrics an agent's Update carries (zeros of the same keys: same encoded size)."""
    return {"train_loss": 0.0, "steps": 0.0, "train_s": 0.0, "tokens": 0.0, "diff_s": 0.0,
            **dict.fromkeys(METRIC_KEYS, 0.0), "encode_s": 0.0, "sent_at": 0.0}


def federated_data(tmp: Path, n_clients: int, samples: int, eval_samples: int) -> tuple[list, list]:
    """Each client's non-IID training rows and the shared held-out rows (synthesize, seed 0)."""
    synthesize(tmp / "data", num_devices=n_clients, samples_per_device=samples, eval_samples=eval_samples, seed=0)
    train = [load_jsonl(tmp / "data" / f"device_{i}.jsonl") for i in range(n_clients)]
    return train, load_jsonl(tmp / "data" / "eval.jsonl")


def run_setting(
    v0: dict, adapter: m.AdapterSpec, uplink: UplinkConfig, budget: int | None, downlink: DownlinkConfig,
    rounds: int, n_clients: int, local_fit: Callable[[dict, int, int], tuple[dict, int, float]],
    state_dir: Path, after_round: Callable[[int, dict], None] | None = None,
) -> dict:
    """One setting's federation from the global ``v0``: per round, each client's ``local_fit(global it
    reconstructed, client, round)`` -> (local - global, samples, train loss) goes through its uplink
    encoder (error feedback persisted under ``state_dir``) into a real Update message, the coordinator
    validates and averages them, its ServerModel publishes the next global as a real GlobalModel message
    (v0's snapshot first), which a device follows through GlobalSync (checked bitwise against the
    coordinator's copy). ``after_round(round, published global)`` is called after each round.

    Returns ``uplink_bytes`` (per round, per client), ``downlink_bytes`` (per round 1..rounds),
    ``v0_snapshot_bytes``, ``chosen`` (last round's encodings), ``train_losses`` and ``final`` (the global)."""
    server = ServerModel(v0, downlink, ServerOptimizerConfig())
    device = GlobalSync(max_elements=1 << 26)  # what each device reconstructs
    snap = server.snapshot(0, 0, adapter, None).to_msgpack()
    device.offer(m.GlobalModel.from_msgpack(snap))
    encoders = [UplinkEncoder(uplink, budget, state_dir / f"dev-{i}") for i in range(n_clients)]
    up_bytes: list[list[int]] = []
    down_bytes, choices, train_losses = [], [], []
    for r in range(1, rounds + 1):
        published = server.published
        assert all(np.array_equal(device.arrays[k], published[k]) for k in published)
        updates, decoded, round_up = [], [], []
        choices = []
        for i in range(n_clients):
            delta, n, tl = local_fit(device.arrays, i, r)
            train_losses.append(tl)
            metrics = probe_metrics()
            enc, um = encoders[i].encode(
                delta, lambda e, i=i, n=n, metrics=metrics: len(update_msg(i, n, metrics, e).to_msgpack()))
            payload = update_msg(i, n, {**metrics, **um}, enc).to_msgpack()
            assert len(payload) == um["uplink_bytes"]
            round_up.append(len(payload))
            choices.append({k: um[k] for k in ("uplink_density", "uplink_value_bits")})
            upd = m.Update.from_msgpack(payload)  # what the coordinator receives
            updates.append(upd)
            decoded.append(validate_update_tensors(published, upd))
        up_bytes.append(round_up)
        server.step(mean_delta(published, updates, decoded))
        gm = server.advance(r, r, adapter, None)
        payload = gm.to_msgpack()
        down_bytes.append(len(payload))
        device.offer(m.GlobalModel.from_msgpack(payload))
        assert device.version == r
        if after_round is not None:
            after_round(r, server.published)
    final = {k: v.copy() for k, v in server.published.items()}
    assert all(np.array_equal(device.arrays[k], final[k]) for k in final)  # bitwise agreement
    return {"uplink_bytes": up_bytes, "downlink_bytes": down_bytes, "v0_snapshot_bytes": len(snap),
            "chosen": choices, "train_losses": train_losses, "final": final}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=40)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=80, help="training examples per client")
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--only", nargs="*", help="run only settings whose name contains one of these")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result file and doc section (several schedules)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(2)
    from edge_agent.methods import get_method

    model_path = resolve_model("smollm2-135m")
    adapters = {frozen: m.AdapterSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"), freeze_a=frozen)
                for frozen in (False, True)}
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-compression-") as tmp_s:
        tmp = Path(tmp_s)
        train, evalset = federated_data(tmp, N_CLIENTS, args.samples, args.eval_samples)
        methods: dict[bool, object] = {}  # by freeze_a, built on first use (same seeded init)

        def method_for(frozen: bool):
            if frozen not in methods:
                methods.clear()  # one model in memory at a time
                lora = get_method("lora")
                methods[frozen] = lora(model_path, adapters[frozen], device="cpu", dtype="float32", seed=0)
            return methods[frozen]

        method = method_for(False)
        v0 = method.get_adapter()
        fit_base = m.FitConfig(local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
                               max_seq_len=args.max_seq_len)
        eval_cfg = fit_base.model_copy(update={"batch_size": 16})

        def evaluate(weights: dict, frozen: bool = False) -> float:
            meth = method_for(frozen)
            meth.set_adapter(weights)
            return float(meth.evaluate(evalset, eval_cfg)[0])

        def local_fit(weights: dict, i: int, round_no: int, frozen: bool = False) -> tuple[dict, int, float]:
            meth = method_for(frozen)
            meth.set_adapter(weights)
            # the coordinator's seed rule: fit.seed + round * 7919 + attempt
            res = meth.fit(train[i], fit_base.model_copy(update={"seed": round_no * 7919}))
            local = meth.get_adapter()
            return {k: local[k] - weights[k] for k in weights}, res.num_samples, res.train_loss

        t0 = time.perf_counter()
        baseline = evaluate(v0)
        print(f"baseline eval loss {baseline:.4f} ({time.perf_counter() - t0:.1f}s)", flush=True)
        t0 = time.perf_counter()
        round1 = {False: [local_fit(v0, i, 1) for i in range(N_CLIENTS)]}
        print(f"round 1 local training {time.perf_counter() - t0:.1f}s", flush=True)

        # every element as fp32 (auto_sparse off): the reference size of a dense LoRA update
        enc0 = encode(round1[False][0][0], CodecSpec(auto_sparse=False))
        dense_bytes = len(update_msg(0, 1, probe_metrics(), enc0).to_msgpack())

        results = []
        for st in settings(dense_bytes):
            if args.only and not any(o in st["name"] for o in args.only):
                continue
            t_set = time.perf_counter()
            frozen = bool(st.get("freeze_a"))
            adapter = adapters[frozen]
            if frozen not in round1:  # round 1 from the same global and seeds: computed once per adapter kind
                round1[frozen] = [local_fit(v0, i, 1, frozen) for i in range(N_CLIENTS)]
            run = run_setting(
                v0, adapter, UplinkConfig(**st["uplink"]), st.get("budget"), DownlinkConfig(snapshot_every=10,
                                                                                           **st["downlink"]),
                args.rounds, N_CLIENTS,
                lambda w, i, r, frozen=frozen: round1[frozen][i] if r == 1 else local_fit(w, i, r, frozen),
                tmp / st["name"].replace(" ", "_"))
            up_bytes = [b for rnd in run["uplink_bytes"] for b in rnd]
            down_bytes = run["downlink_bytes"]  # v0's snapshot not counted here (see bench/defaults.py)
            choices, train_losses, final = run["chosen"], run["train_losses"], run["final"]
            loss = evaluate(final, frozen)
            res = {
                "name": st["name"], "uplink": st["uplink"], "budget_bytes": st.get("budget"),
                "downlink": st["downlink"], "freeze_a": frozen,
                "uplink_bytes_per_round_per_client": float(np.mean(up_bytes)),
                "uplink_bytes_max": int(max(up_bytes)),
                "downlink_bytes_per_round_per_client": float(np.mean(down_bytes)),
                "final_eval_loss": loss,
                "mean_train_loss_last_round": float(np.mean(train_losses[-N_CLIENTS:])),
                "chosen": choices[-N_CLIENTS:],
                "seconds": time.perf_counter() - t_set,
            }
            results.append(res)
            print(f"{st['name']:24s} up {res['uplink_bytes_per_round_per_client']:10.0f} B  down "
                  f"{res['downlink_bytes_per_round_per_client']:10.0f} B  eval {loss:.4f}  ({res['seconds']:.0f}s)",
                  flush=True)
            report(args, baseline, dense_bytes, results)  # partial results survive an interrupted run
    report(args, baseline, dense_bytes, results, final=True)
    return 0


def report(
    args: argparse.Namespace, baseline: float, dense_bytes: int, results: list[dict], final: bool = False,
) -> None:

    results = [dict(r) for r in results]
    ref = next((r for r in results if r["name"] == "dense fp32"), None)
    for r in results:
        if ref:
            r["uplink_reduction_x"] = (ref["uplink_bytes_per_round_per_client"]
                                       / r["uplink_bytes_per_round_per_client"])
            r["downlink_reduction_x"] = (ref["downlink_bytes_per_round_per_client"]
                                         / r["downlink_bytes_per_round_per_client"])
            r["eval_loss_vs_dense_pct"] = 100 * (r["final_eval_loss"] / ref["final_eval_loss"] - 1)

    def best(min_x: float, max_pct: float) -> dict | None:
        ok = [r for r in results
              if r.get("uplink_reduction_x", 0) >= min_x and r.get("eval_loss_vs_dense_pct", 1e9) <= max_pct]
        return max(ok, key=lambda r: r["uplink_reduction_x"]) if ok else None

    targets = {"10x_at_2pct": best(10, 2.0), "50x_at_5pct": best(50, 5.0)}
    out = {"benchmark": "compression", "command": command_line(), "machine": machine(), "args": vars(args),
           "baseline_eval_loss": baseline, "dense_fp32_update_bytes": dense_bytes, "results": results,
           "targets": {k: (v["name"] if v else None) for k, v in targets.items()}}
    name = "compression" + (f"-{args.tag}" if args.tag else "")
    path = write_json(name, out)

    rows = [[r["name"], f"{r['uplink_bytes_per_round_per_client']:,.0f}", f"{r.get('uplink_reduction_x', 0):.1f}×",
             f"{r['downlink_bytes_per_round_per_client']:,.0f}", f"{r.get('downlink_reduction_x', 0):.1f}×",
             f"{r['final_eval_loss']:.4f}", f"{r.get('eval_loss_vs_dense_pct', 0):+.2f} %"] for r in results]

    def verdict(key: str, x: int, pct: int) -> str:
        r = targets[key]
        if r is None:
            return f"≥{x}× at ≤{pct} %: **not met** by any setting"
        return (f"≥{x}× at ≤{pct} %: **met** by {r['name']} ({r['uplink_reduction_x']:.1f}× fewer uplink bytes, "
                f"eval loss {r['eval_loss_vs_dense_pct']:+.2f} % vs dense fp32)")

    md = (
        f"## Compression, {args.rounds} rounds × {args.local_steps} local steps: "
        "uplink/downlink bytes vs final eval loss (`bench/compression.py`)\n\n"
        f"`{out['command']}` — SmolLM2-135M-Instruct, LoRA r=8 on q_proj/v_proj (fp32 base), {N_CLIENTS} clients "
        f"with non-IID synthetic data ({args.samples} examples each), {args.rounds} rounds × {args.local_steps} local "
        f"AdamW steps (batch {args.batch_size}, ≤{args.max_seq_len} tokens, lr {args.lr}), FedAvg, "
        f"same seeds for every setting; final loss on {args.eval_samples} held-out examples (baseline before training "
        f"{baseline:.4f}). {machine()['cores']} cores, {out['machine']['date']}, commit {out['machine']['commit']}.\n\n"
        "In-process harness: the 4 clients run in sequence on one model instance (adapters swapped), through "
        "the production training method, uplink encoder (error feedback, byte budget), msgpack messages, "
        "coordinator decoding/sparse aggregation and snapshot/difference downlink; byte counts are the real "
        "encoded `Update`/`GlobalModel` payloads (msgpack, before chunking). "
        "Downlink: dense settings send lossless (fp32/fp16) differences, compressed settings int8+zstd "
        "differences with server-side error feedback; every device's reconstruction was checked bitwise "
        "against the coordinator's. Top-k is global across the adapter; sparse uplinks use zstd. "
        "int4, int2 and sign are block-scaled low-bit value formats (block 64, fp32 scales); frozen-A settings "
        "train only lora_B (FFA-LoRA, `adapter.freeze_a`), so A's difference is zero and is not sent. "
        "Every row is compared with vanilla dense fp32 LoRA (A and B trained and sent).\n\n"
        + md_table(["setting", "uplink B/round/client", "vs fp32", "downlink B/round/client", "vs fp32",
                    "final eval loss", "vs dense fp32"], rows)
        + f"\n\nDense fp32 update: {dense_bytes:,} B. Targets: {verdict('10x_at_2pct', 10, 2)}; "
        f"{verdict('50x_at_5pct', 50, 5)}. Budget runs' chosen encodings (last round, per client): "
        + "; ".join(f"{r['name']}: " + ", ".join(f"density {c['uplink_density']:.3f} / {c['uplink_value_bits']:.0f}-bit"
                                                  for c in r["chosen"]) for r in results if r["budget_bytes"])
        + ".\n"
    )
    if not args.no_doc:
        update_doc_section(name, md)
    if final:
        print(md)
        print(f"results: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
