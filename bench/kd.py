"""KD-FedLLM (federated distillation over logits) against local-only training and FedAvg LoRA.

SmolLM2-135M-Instruct, 3 devices with non-IID synthetic task families (checkable answers), the
same seeds everywhere, all rows in one run:

- local-only: each device trains its own LoRA adapter on its own data, no federation;
- FedAvg LoRA: the adapter federation (dense float32 both ways), the in-process harness of
  bench/compression.py (real Update / GlobalModel messages, coordinator validation and FedAvg);
- KD, same model: every device SmolLM2-135M with its own adapter, the kd mode's coordinator
  (``broker_coordinator.modes.kd``) combining their top-k log-probs on the public probe set into
  the consensus they distil from (real KdUpdate / KdConsensus messages: the bytes reported);
- KD, two models: devices 0 and 1 SmolLM2-135M, device 2 the smaller model ``--small``: some of
  SmolLM2-135M's blocks, spread over its depth (``smollm2-135m:spread=N``) or healed by distillation
  (``smollm2-135m:shrunk=N``, ``fedmq model shrink``): a mix that parameter averaging cannot federate.

The probe set is public material (prompt + answer) from every family, its prompts disjoint from
the eval rows and the training rows. Per device and row: held-out loss (mean over the group's
families of the token-mean loss on the answer) and exact-match accuracy (greedy answer checked by
``edge_agent.data.check_answer``) on its own families and on the families it never saw; uplink
and downlink bytes per client per round. Round 1 of every row is the same local fit from the same
LoRA init (no consensus yet), computed once. Before training, the smaller model is evaluated beside
the full one (and, for a healed student, the raw cut of its blocks).

    OMP_NUM_THREADS=1 python bench/kd.py    # the recorded run (sizes: the --help defaults)
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.compression import federated_data, run_setting
from bench.report import command_line, machine, md_table, update_doc_section, write_json
from broker_coordinator.config import CoordinatorConfig
from broker_coordinator.downlink import DownlinkConfig
from broker_coordinator.modes import create_mode
from edge_agent.data import DEFAULT_FAMILIES, Example, check_answer, make_examples
from edge_agent.models import resolve_model, save_cut
from edge_agent.shrink import read_manifest
from edge_agent.uplink import UplinkConfig
from fedmq_protocol import messages as m
from fedmq_protocol.modes.kd import KdConsensus, KdUpdate, Probe, consensus_topic, encode_topk, probes_topic

N = 3
BASE = "fedmq/bench"
TARGET_PROBES = 256


def probe_set(path: Path, per_family: int, avoid: set[str]) -> list[Example]:
    rng = random.Random("fedmq-kd-bench-probes")
    out: list[Example] = []
    for fam in DEFAULT_FAMILIES:
        out += make_examples(fam, per_family, rng, avoid)
    assert not {e.prompt for e in out} & avoid, "probe prompts must be disjoint from eval and training rows"
    import json

    path.write_text("".join(json.dumps({"prompt": e.prompt, "response": e.response, "family": e.family}) + "\n"
                            for e in out))
    return out


def raw_cut(base: str, keep: list[int], out: Path) -> str:
    """The checkpoint at ``base`` cut to the blocks ``keep`` (unhealed), saved under ``out``."""
    save_cut(base, keep, out)
    return str(out)


def small(model: str) -> bool:
    """Whether a row's model is the smaller one (a cut or a healed student)."""
    return any(s in model for s in (":blocks=", ":spread=", ":shrunk=", "raw cut"))


def describe(model: str) -> str:
    """A short name for a model of the rows: full, a cut or a healed student."""
    for suffix, what in ((":blocks=", "first {} blocks"), (":spread=", "{} blocks spread"),
                         (":shrunk=", "{}-block healed student")):
        if suffix in model:
            return what.format(model.rpartition(suffix)[2])
    return "raw cut" if "raw cut" in model else "full"


def generate(meth: Any, examples: list[Example], max_new: int) -> list[str]:
    import torch

    tok = meth.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    texts: list[str] = []
    with torch.no_grad():
        for s in range(0, len(examples), 16):
            prompts = [meth._token_ids(e)[0] for e in examples[s:s + 16]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad, dtype=torch.long)
            attn = torch.zeros((len(prompts), width), dtype=torch.long)
            for i, p in enumerate(prompts):
                ids[i, width - len(p):] = torch.tensor(p)
                attn[i, width - len(p):] = 1
            out = meth.model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new, do_sample=False,
                                      pad_token_id=pad)
            texts += tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--local-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--samples", type=int, default=40, help="training examples per device")
    ap.add_argument("--eval-per-family", type=int, default=3)
    ap.add_argument("--probes-per-family", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--lam", type=float, default=2.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--weighting", default="confidence", choices=["samples", "confidence", "best"])
    ap.add_argument("--confidence-power", type=float, default=1.5,
                    help="kd.confidence_power: with weighting confidence, confidences are raised to it")
    ap.add_argument("--select", default="better", choices=["all", "better"],
                    help="probes a device distils on (kd.select): all, or where the consensus explains them better")
    ap.add_argument("--probe-batch", type=int, default=4)
    ap.add_argument("--no-compare-best", dest="compare_best", action="store_false",
                    help="skip the KD rows' second run with weighting best and select all")
    ap.add_argument("--small", default="{model}:spread=15",
                    help="the smaller model of the mixed row ({model}: --model): ':spread=N' N of its blocks "
                         "spread over its depth, ':blocks=N' its first N, ':shrunk=N' a healed student "
                         "(SmolLM2-135M has 30 blocks)")
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--model", default="smollm2-135m", help="the larger model (tiny-llama: a smoke test)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--from-json", type=Path,
                    help="re-render the doc section of a recorded run (bench/results/kd.json)")
    args = ap.parse_args()
    if args.from_json:
        rec = __import__("json").loads(args.from_json.read_text())
        report(argparse.Namespace(**{**rec["args"], "no_doc": args.no_doc}), rec["rows"], rec["baseline"],
               rec["families"], rec["params"], rec["probes"], rec["seconds"], recorded=rec,
               student=rec.get("student"))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from edge_agent.methods.kd import Distill, KdMethod

    t_start = time.perf_counter()
    big_name, small_name = args.model, args.small.format(model=args.model)
    if not small(small_name):
        ap.error(f"--small {args.small!r}: expected {args.model}:spread=N, :blocks=N or :shrunk=N")
    paths = {big_name: resolve_model(big_name), small_name: resolve_model(small_name)}
    student = read_manifest(paths[small_name]) or {}  # a healed student's manifest; {} for a cut
    adapter = m.AdapterSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    meths = {name: KdMethod(p, adapter, device="cpu", dtype="float32", seed=0) for name, p in paths.items()}
    v0 = {name: mt.get_state() for name, mt in meths.items()}
    params = {name: sum(p.numel() for p in mt.model.parameters()) for name, mt in meths.items()}
    fit = m.FitConfig(local_steps=args.local_steps, lr=args.lr, batch_size=args.batch_size,
                      max_seq_len=args.max_seq_len)
    eval_cfg = fit.model_copy(update={"batch_size": 16})

    with tempfile.TemporaryDirectory(prefix="fedmq-bench-kd-") as tmp_s:
        tmp = Path(tmp_s)
        train, evalset = federated_data(tmp, N, args.samples, args.eval_per_family * len(DEFAULT_FAMILIES))
        import json

        manifest = json.loads((tmp / "data" / "manifest.json").read_text())
        fams = [d["families"] for d in manifest["devices"]]
        avoid = {e.prompt for e in evalset} | {e.prompt for rows in train for e in rows}
        probes_ex = probe_set(tmp / "probes.jsonl", args.probes_per_family, avoid)
        probes = [Probe(prompt=e.prompt, response=e.response) for e in probes_ex]
        by_family = {f: [e for e in evalset if e.family == f] for f in DEFAULT_FAMILIES}

        def evaluate(model: str, state: dict) -> dict[str, dict[str, float]]:
            """Per family: held-out loss and exact-match accuracy."""
            meth = meths[model]
            meth.set_state(state)
            answers = generate(meth, evalset, args.max_new_tokens)
            ok = {f: [] for f in DEFAULT_FAMILIES}
            for e, a in zip(evalset, answers, strict=True):
                ok[str(e.family)].append(check_answer(e, a))
            return {f: {"loss": float(meth.evaluate(by_family[f], eval_cfg)[0]), "acc": float(np.mean(ok[f]))}
                    for f in DEFAULT_FAMILIES}

        def split(per_family: dict, i: int) -> dict[str, float]:
            own, unseen = fams[i], [f for f in DEFAULT_FAMILIES if f not in fams[i]]
            return {"own_loss": float(np.mean([per_family[f]["loss"] for f in own])),
                    "own_acc": float(np.mean([per_family[f]["acc"] for f in own])),
                    "unseen_loss": float(np.mean([per_family[f]["loss"] for f in unseen])),
                    "unseen_acc": float(np.mean([per_family[f]["acc"] for f in unseen]))}

        def local_fit(model: str, state: dict, i: int, r: int, distill: Distill | None = None) -> tuple[dict, Any]:
            meth = meths[model]
            meth.set_state(state)
            res = meth.fit(train[i], fit.model_copy(update={"seed": r * 7919}), distill=distill)
            return meth.get_state(), res

        t0 = time.perf_counter()
        baseline = {name: evaluate(name, v0[name]) for name in meths}
        if student:  # a healed student's blocks before healing: what a plain cut gives
            raw_name = f"{args.model}, raw cut"
            meths[raw_name] = KdMethod(raw_cut(paths[big_name], student["kept_blocks"], tmp / "raw-cut"), adapter,
                                       device="cpu", dtype="float32", seed=0)
            baseline[raw_name] = evaluate(raw_name, meths[raw_name].get_state())
            del meths[raw_name]
        print(f"baselines evaluated ({time.perf_counter() - t0:.0f}s): " + "; ".join(
            f"{n} loss {np.mean([v['loss'] for v in b.values()]):.3f}" for n, b in baseline.items()), flush=True)
        round1: dict[tuple[str, int], tuple[dict, float]] = {}

        def fit_cached(model: str, state: dict, i: int, r: int, distill: Distill | None = None) -> tuple[dict, float]:
            if r == 1 and (model, i) in round1:
                return round1[(model, i)]
            st, res = local_fit(model, state, i, r, distill)
            if r == 1:
                round1[(model, i)] = (st, res.train_loss)
            return st, res.train_loss

        rows: list[dict] = []

        # -- local-only ------------------------------------------------------------------------
        def local_only(model: str, devices: list[int]) -> dict:
            t_row = time.perf_counter()
            out = {}
            for i in devices:
                st = v0[model]
                for r in range(1, args.rounds + 1):
                    st, _ = fit_cached(model, st, i, r)
                out[i] = {"model": model, **split(evaluate(model, st), i)}
            print(f"local-only {model} {devices} ({time.perf_counter() - t_row:.0f}s)", flush=True)
            return out

        local_big = local_only(big_name, list(range(N)))
        rows.append({"name": "local-only", "devices": local_big, "uplink": 0, "downlink": 0})

        # -- FedAvg LoRA -----------------------------------------------------------------------
        t_row = time.perf_counter()

        def fedavg_fit(weights: dict, i: int, r: int) -> tuple[dict, int, float]:
            st, loss = fit_cached(big_name, weights, i, r)
            return {k: st[k] - weights[k] for k in weights}, len(train[i]), loss

        run = run_setting(v0[big_name], adapter, UplinkConfig(values="float32"), None,
                          DownlinkConfig(values="float32", zstd=False), args.rounds, N, fedavg_fit, tmp / "fedavg")
        fa_eval = evaluate(big_name, run["final"])
        rows.append({"name": "FedAvg LoRA", "devices": {i: {"model": big_name, **split(fa_eval, i)} for i in range(N)},
                     "uplink": float(np.mean(run["uplink_bytes"])),
                     "downlink": (run["v0_snapshot_bytes"] + sum(run["downlink_bytes"])) / args.rounds})
        print(f"fedavg ({time.perf_counter() - t_row:.0f}s)", flush=True)

        # -- KD --------------------------------------------------------------------------------
        def kd_row(name: str, models: list[str], weighting: str = args.weighting, select: str = args.select) -> dict:
            t_row = time.perf_counter()
            cfg = CoordinatorConfig.model_validate({
                "adapter": adapter.model_dump(), "kd": {
                    "probe_path": str(tmp / "probes.jsonl"), "top_k": args.top_k, "weighting": weighting,
                    "select": select, "confidence_power": args.confidence_power,
                    "lambda": args.lam, "temperature": args.temperature,
                    "probe_batch_size": args.probe_batch}})
            mode = create_mode(cfg)
            init = dict(mode.retained_messages(BASE))
            probe_bytes = len(init[probes_topic(BASE)])
            v0_bytes = len(mode.initial_global().to_msgpack())
            states = [v0[mdl] for mdl in models]
            target: tuple[np.ndarray, np.ndarray] | None = None
            up, down, kl = [], [], []
            for r in range(1, args.rounds + 1):
                task = mode.task_payload("fit", r)
                updates, contribs, round_up, round_kl = [], [], [], []
                for i, mdl in enumerate(models):
                    distill = None if target is None else Distill(
                        probes, target[0], target[1], task.lam, task.temperature, task.max_response_tokens,
                        task.probe_batch_size, select=task.select)
                    states[i], _ = fit_cached(mdl, states[i], i, r, distill)
                    meth = meths[mdl]
                    meth.set_state(states[i])
                    ans = meth.probe_topk(probes, top_k=task.top_k, max_response_tokens=task.max_response_tokens,
                                          max_len=args.max_seq_len, consensus=target)
                    if ans.kl is not None:
                        round_kl.append(ans.kl)
                    ids, lps = encode_topk(ans.ids, ans.logprobs, task.logprob_values)
                    payload = KdUpdate(probe_sha256=task.manifest.sha256, tokenizer=meth.tokenizer_fingerprint,
                                       vocab_size=meth.vocab_size, positions=tuple(ans.positions), ids=ids,
                                       logprobs=lps, confidence=ans.confidence.astype("<f4").tobytes())
                    data = m.Update(kind="fit", task_id=f"r{r}", round=r, device_id=f"dev-{i}", base_version=r - 1,
                                    num_samples=len(train[i]), payload=payload).to_msgpack()
                    round_up.append(len(data))
                    upd = m.Update.from_msgpack(data)  # what the coordinator receives
                    contribs.append(mode.validate_update(upd))
                    updates.append(upd)
                outcome = mode.aggregate(r, r, updates, contribs)
                retained = dict(mode.retained_messages(BASE))
                cons_bytes = retained[consensus_topic(BASE)]
                down.append(len(cons_bytes) + len(outcome.message.to_msgpack()))
                target = KdConsensus.from_msgpack(cons_bytes).arrays()  # what every device receives
                up.append(round_up)
                kl.append(float(np.mean(round_kl)) if round_kl else None)
            devices = {i: {"model": mdl, **split(evaluate(mdl, states[i]), i)} for i, mdl in enumerate(models)}
            print(f"{name} ({time.perf_counter() - t_row:.0f}s)", flush=True)
            positions = sum(mode.positions or ())
            return {"name": name, "weighting": weighting, "select": select, "devices": devices,
                    "uplink": float(np.mean(up)),
                    "downlink": (v0_bytes + probe_bytes + sum(down)) / args.rounds,
                    "downlink_excl_probe_set": float(np.mean(down)), "probe_set_bytes": probe_bytes,
                    "probe_kl_per_round": kl, "positions": positions,
                    "uplink_per_probe": float(np.mean(up)) / len(probes)}

        # each federation also with FedMKT's per-probe best device and no selection on the device
        compare = args.compare_best and (args.weighting, args.select) != ("best", "all")
        rows.append(kd_row("KD, same model", [big_name] * N))
        if compare:
            rows.append(kd_row("KD, same model, weighting best, select all", [big_name] * N,
                               weighting="best", select="all"))
        local_small = local_only(small_name, [N - 1])
        rows.append(kd_row("KD, two models", [big_name] * (N - 1) + [small_name]))
        if compare:
            rows.append(kd_row("KD, two models, weighting best, select all", [big_name] * (N - 1) + [small_name],
                               weighting="best", select="all"))
        rows.insert(1, {"name": f"local-only, {describe(small_name)}", "devices": local_small, "uplink": 0,
                        "downlink": 0})
    report(args, rows, baseline, fams, params, len(probes), time.perf_counter() - t_start, student=student)
    return 0


def report(args: argparse.Namespace, rows: list[dict], baseline: dict, fams: list, params: dict, n_probes: int,
           seconds: float, recorded: dict | None = None, student: dict | None = None) -> None:
    """The JSON and the doc section; ``recorded``: a recorded run's JSON (its command and machine kept)."""
    local = {**rows[0]["devices"], **{f"small-{i}": d for i, d in rows[1]["devices"].items()}}
    fedavg = next(r for r in rows if r["name"] == "FedAvg LoRA")
    dense_up = fedavg["uplink"]
    targets = []
    for r in rows:
        for i, d in r["devices"].items():
            ref = local[f"small-{i}"] if small(d["model"]) else local[i]
            d["unseen_loss_vs_local_pct"] = 100 * (d["unseen_loss"] / ref["unseen_loss"] - 1)
            d["own_loss_vs_local_pct"] = 100 * (d["own_loss"] / ref["own_loss"] - 1)
        if r["name"].startswith("KD"):
            per256 = r["uplink_per_probe"] * TARGET_PROBES
            r["uplink_256_probes"] = per256
            r["uplink_256_vs_dense_lora_x"] = dense_up / per256
            met = all(d["unseen_loss_vs_local_pct"] <= -10 for d in r["devices"].values())
            targets.append(f"{r['name']}: unseen-family loss ≤ −10 % vs local-only on every device: "
                           f"{'met' if met else 'missed'} ("
                           + ", ".join(f"dev-{i} {d['unseen_loss_vs_local_pct']:+.1f} %"
                                       for i, d in r["devices"].items())
                           + f"); uplink for {TARGET_PROBES} probes {per256:,.0f} B vs dense LoRA {dense_up:,.0f} B "
                           f"(dense LoRA / KD = {r['uplink_256_vs_dense_lora_x']:.1f}×: "
                           f"{'met' if per256 <= dense_up else 'missed'})")
    compare = []
    for r in rows:
        if not r["name"].startswith("KD"):
            continue
        for i, d in r["devices"].items():
            if small(d["model"]):
                continue  # FedAvg cannot federate this device's model at all
            f = fedavg["devices"][i]
            compare.append(f"{r['name']} dev-{i}: unseen loss {d['unseen_loss']:.3f} vs FedAvg "
                           f"{f['unseen_loss']:.3f} "
                           f"({100 * (d['unseen_loss'] / f['unseen_loss'] - 1):+.1f} %), own loss {d['own_loss']:.3f} "
                           f"vs {f['own_loss']:.3f} ({100 * (d['own_loss'] / f['own_loss'] - 1):+.1f} %)")
    kd0 = next(r for r in rows if r["name"].startswith("KD"))
    compare.append(f"bytes per client per round: uplink {kd0['uplink']:,.0f} B (KD) vs {dense_up:,.0f} B (FedAvg, "
                   f"{dense_up / kd0['uplink']:.0f}×), downlink {kd0['downlink']:,.0f} B vs "
                   f"{fedavg['downlink']:,.0f} B "
                   f"({fedavg['downlink'] / kd0['downlink']:.0f}×)")
    out = {"benchmark": "kd", "command": recorded["command"] if recorded else command_line(),
           "machine": recorded["machine"] if recorded else machine(), "args": vars(args), "seconds": seconds,
           "families": fams, "params": params, "probes": n_probes, "baseline": baseline, "rows": rows,
           "targets": targets, "vs_fedavg": compare, "student": student}
    path = write_json("kd", out)

    short = describe
    small_name = next(d["model"] for d in rows[1]["devices"].values())

    table = []
    for r in rows:
        for i, d in r["devices"].items():
            table.append([r["name"], f"dev-{i} ({short(d['model'])})", f"{d['own_loss']:.3f}", f"{d['own_acc']:.2f}",
                          f"{d['unseen_loss']:.3f}", f"{d['unseen_acc']:.2f}",
                          f"{d['unseen_loss_vs_local_pct']:+.1f} %",
                          f"{r['uplink']:,.0f}", f"{r['downlink']:,.0f}"])
    kd_rows = [r for r in rows if r["name"].startswith("KD")]
    healed = ""
    if student:
        rc = student["recipe"]
        healed = (f" — blocks {student['kept_blocks']} healed by `fedmq model shrink` ({rc['steps']} AdamW steps, "
                  f"batch {rc['batch_size']}, lr {rc['lr']}, T={rc['temperature']}, top-{rc['top_k']} KL + "
                  f"{rc['lm_weight']} × LM loss, on {rc['texts'] - rc['held_out']} texts the teacher wrote after "
                  f"neutral prompts, seed {rc['seed']}; held-out KL to the teacher "
                  f"{student['held_out_kl_before']:.2f} → {student['held_out_kl_after']:.2f})")
    cp = getattr(args, "confidence_power", 1.0)
    power = f" (confidence power {cp:g})" if args.weighting == "confidence" and cp != 1 else ""
    md = (
        "## KD-FedLLM: distillation over logits vs local-only and FedAvg LoRA (`bench/kd.py`)\n\n"
        f"`{out['command']}` ({seconds / 60:.1f} min) — {args.model} ({params[next(iter(params))]:,} "
        f"parameters) and `{small_name}`, {describe(small_name)} ({list(params.values())[1]:,}){healed}, "
        "LoRA r=8 on q_proj/v_proj, "
        f"{N} devices with non-IID synthetic families (" + "; ".join(f"dev-{i}: {', '.join(f)}" for i, f in
                                                               enumerate(fams))
        + f"), {args.samples} training examples each, {args.rounds} rounds × {args.local_steps} local AdamW steps "
        f"(batch {args.batch_size}, lr {args.lr}), the same seeds in every row. KD: probe set of {n_probes} public "
        f"prompts with their answers ({args.probes_per_family} per family, prompts disjoint from eval and training "
        f"rows), top-{args.top_k} log-probs (float16, zstd) per answer token, consensus weighting "
        f"`{args.weighting}`{power}, select `{getattr(args, 'select', 'all')}`, λ={args.lam}, T={args.temperature}, "
        f"{args.probe_batch} probes per step. Held-out: "
        f"{args.eval_per_family} rows per family; loss = mean over the group's families of the answer-token loss, "
        "accuracy = exact match of the greedy answer. Bytes: encoded msgpack messages per client per round (KD "
        "downlink: consensus + global, plus the one-off probe set and v0 amortised over the rounds; FedAvg: dense "
        f"float32 both ways, v0 snapshot amortised). {out['machine']['cores']} cores shared with other jobs, "
        f"{out['machine']['date']}, commit {out['machine']['commit']}. Sizes are far below a real run "
        "(few rounds, steps and eval rows), chosen for ~12 minutes on 2 unloaded cores.\n\n"
        + md_table(["row", "device", "own loss", "own acc", "unseen loss", "unseen acc", "unseen loss vs local-only",
                    "uplink B", "downlink B"], table)
        + "\n\nBefore training: " + "; ".join(
            f"{short(n)} loss {np.mean([v['loss'] for v in b.values()]):.3f}, acc "
            f"{np.mean([v['acc'] for v in b.values()]):.2f}" for n, b in baseline.items())
        + ". Probe-set KL to the consensus (rounds 2…): " + "; ".join(
            f"{r['name']}: " + " → ".join(f"{x:.3f}" for x in r["probe_kl_per_round"] if x is not None)
            for r in kd_rows)
        + f". Probe set {kd_rows[0]['probe_set_bytes']:,} B once; KD uplink {kd_rows[0]['uplink_per_probe']:,.0f} B "
        f"per probe ({kd_rows[0]['positions']} positions).\n\nTargets:\n\n"
        + "\n".join(f"- {t}" for t in targets)
        + f"\n\nAgainst FedAvg LoRA (same model everywhere; KD's {describe(small_name)} device has no FedAvg "
        "counterpart): "
        + "; ".join(compare) + ".\n"
    )
    if not args.no_doc:
        update_doc_section("kd", md)
    print(md)
    print(f"results: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
