"""FedKRSO against FedAvg LoRA and FedKSeed on SmolLM2-135M-Instruct (fp32 base, CPU), one run.

Rows: FedKRSO r=8 and r=4 (every linear of the transformer blocks), FedAvg LoRA r=8 on every linear,
FedAvg LoRA r=8 on q_proj/v_proj, FedKSeed on every parameter. The same non-IID synthetic data
(``bench.compression.federated_data``), clients, rounds, local steps, batches and seeds for every
row. The learning-rate sweep: each method runs round 1 at 3 learning rates; the one with the lowest
held-out loss after round 1 continues to the last round (a full run per lr does not fit the time
this shared machine gives a benchmark).

Federation runs in process with the production pieces: the trainers (``KrsoMethod``, ``LoraMethod``,
``ZoMethod``), the uplink encoder (dense float32 for every row, so bytes compare like for like) into
real ``Update`` messages, the servers' rules (FedKRSO / FedKSeed ledger aggregation of
``fedmq_protocol.modes``, sample-weighted FedAvg of LoRA differences) and real ledger / float32
``GlobalModel`` messages; FedKRSO and FedKSeed clients restore the round-start snapshot from disk
and apply the round as agents do.
Bytes are the encoded msgpack payloads (before MQTT chunking).

Peak step memory and step time come from one separate process per method (``--probe``): the
model loaded, then local steps on one client's data; the peak is the kernel's high-water mark of the
process over the steps (``edge_agent.memory.meter``), the time the median step.

    OMP_NUM_THREADS=1 python bench/krso.py    # the recorded run (sizes: see --help)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.compression import federated_data
from bench.report import command_line, machine, md_table, update_doc_section, write_json
from edge_agent.models import resolve_model
from edge_agent.uplink import UplinkConfig, UplinkEncoder
from fedmq_protocol import messages as m
from fedmq_protocol.codec import CodecSpec, encode
from fedmq_protocol.modes import krso as K
from fedmq_protocol.modes import zo as Z

N_CLIENTS = 3
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROWS: dict[str, dict[str, Any]] = {
    "FedKRSO r=8": {"kind": "krso", "r": 8, "lrs": (1e-4, 3e-4, 1e-3)},
    "FedKRSO r=4": {"kind": "krso", "r": 4, "lrs": (1e-4, 3e-4, 1e-3)},
    "FedAvg LoRA r=8 all linear": {"kind": "lora", "r": 8, "targets": ALL, "lrs": (1e-3, 3e-3, 1e-2)},
    "FedAvg LoRA r=8 q,v": {"kind": "lora", "r": 8, "targets": ("q_proj", "v_proj"), "lrs": (1e-3, 3e-3, 1e-2)},
    "FedKSeed (full)": {"kind": "zo", "lrs": (1e-6, 1e-5, 1e-4)},
}
LORA_ALL = "FedAvg LoRA r=8 all linear"
FP32_UP = UplinkConfig(values="float32", error_feedback=False)


def fit_config(args: argparse.Namespace, lr: float, round_no: int = 0) -> m.FitConfig:
    # the coordinator's seed rule: fit.seed + round * 7919 + attempt
    return m.FitConfig(local_steps=args.local_steps, lr=lr, batch_size=args.batch_size,
                       max_seq_len=args.max_seq_len, seed=round_no * 7919)


def build(row: dict, model_path: str, krso_rank: int | None = None) -> Any:
    from edge_agent.methods.krso import KrsoMethod
    from edge_agent.methods.lora import LoraMethod
    from edge_agent.methods.zo import ZoMethod

    if row["kind"] == "krso":
        return KrsoMethod(model_path, m.AdapterSpec(), device="cpu", dtype="float32")
    if row["kind"] == "lora":
        return LoraMethod(model_path, m.AdapterSpec(r=row["r"], alpha=16, target_modules=row["targets"]),
                          device="cpu", dtype="float32", seed=0)
    return ZoMethod(model_path, m.AdapterSpec(), device="cpu", target="full")


def krso_spec(row: dict, args: argparse.Namespace) -> K.KrsoSpec:
    return K.KrsoSpec(seed=1, num_seeds=args.num_seeds, rank=row["r"], interval=args.interval, checkpoint_every=0)


def zo_spec(lr: float) -> Z.ZoSpec:
    return Z.ZoSpec(seed=1, num_seeds=1024, eps=1e-3, lr=lr)


# -- the federations ------------------------------------------------------------------------------
def run_krso(meth: Any, row: dict, lr: float, args: argparse.Namespace, train: list, evalset: list,
             eval_cfg: m.FitConfig, tmp: Path, base_file: Path) -> Iterator[dict]:
    spec = krso_spec(row, args)
    meth.restore(base_file)
    start = tmp / f"krso-r{row['r']}-{lr}-round-start.pt"
    meth.snapshot(start)
    encoders = [UplinkEncoder(FP32_UP, None, None) for _ in range(N_CLIENTS)]
    out: dict[str, list] = {"eval_loss": [], "uplink": [], "downlink": [], "apply_s": [], "seeds_used": []}
    for rnd in range(1, args.rounds + 1):
        task = K.KrsoTask(**spec.model_dump(), round_seed=K.round_seed(spec.seed, rnd))
        seeds = task.seeds()
        contribs, ups, used = [], [], []
        for i in range(N_CLIENTS):
            meth.restore(start)
            res = meth.fit(train[i], fit_config(args, lr, rnd), spec=spec, seeds=seeds)
            payload = K.KrsoUpdate(base_fingerprint=meth.fingerprint, round_seed=task.round_seed,
                                   seeds=tuple(sorted(meth.last_seeds)), start_digest="0" * 32)
            upd = _update(rnd, i, res.num_samples, encoders[i], meth.last_acc, payload)
            ups.append(len(upd.to_msgpack()))
            used.append(len(meth.last_seeds))
            contribs.append((res.num_samples, upd.tensors.decode_dense(max_elements=1 << 28)))
        entry = K.aggregate_round(rnd, spec, task.round_seed, contribs)
        t0 = time.perf_counter()
        meth.restore(start)
        meth.apply_round(K.KrsoLedgerRound.from_msgpack(entry.to_msgpack()))
        out["apply_s"].append(time.perf_counter() - t0)
        meth.snapshot(start)
        task_bytes = len(_task(rnd, task).to_msgpack())
        out["downlink"].append(len(entry.to_msgpack()) + task_bytes)
        out["uplink"].append(float(np.mean(ups)))
        out["seeds_used"].append(used)
        out["eval_loss"].append(float(meth.evaluate(evalset, eval_cfg)[0]))
        print(f"    round {rnd}: eval {out['eval_loss'][-1]:.4f} up {out['uplink'][-1]:,.0f} B "
              f"down {out['downlink'][-1]:,} B apply {out['apply_s'][-1]:.1f}s seeds {used}", flush=True)
        yield out


def run_zo(meth: Any, lr: float, args: argparse.Namespace, train: list, evalset: list, eval_cfg: m.FitConfig,
           tmp: Path, base_file: Path) -> Iterator[dict]:
    spec = zo_spec(lr)
    meth.restore(base_file)
    start = tmp / f"zo-{lr}-round-start.pt"
    meth.snapshot(start)
    out: dict[str, list] = {"eval_loss": [], "uplink": [], "downlink": []}
    for rnd in range(1, args.rounds + 1):
        pools, ups = [], []
        for i in range(N_CLIENTS):
            meth.restore(start)
            res = meth.fit(train[i], fit_config(args, lr, rnd), spec=spec)
            idx, g = Z.pack_pool(meth.last_pool)
            payload = Z.ZoUpdate(base_fingerprint=meth.fingerprint, indices=idx, g=g)
            upd = m.Update(kind="fit", task_id=f"r{rnd}", round=rnd, device_id=f"dev-{i}", base_version=rnd - 1,
                           num_samples=res.num_samples, metrics={"train_loss": res.train_loss}, payload=payload)
            ups.append(len(upd.to_msgpack()))
            pools.append((res.num_samples, payload))
        entry = Z.aggregate_round(rnd, spec, None, pools)
        meth.restore(start)
        meth.apply_round(entry)
        meth.snapshot(start)
        task = Z.ZoTask(**spec.model_dump())
        out["downlink"].append(len(entry.to_msgpack()) + len(_task(rnd, task).to_msgpack()))
        out["uplink"].append(float(np.mean(ups)))
        out["eval_loss"].append(float(meth.evaluate(evalset, eval_cfg)[0]))
        print(f"    round {rnd}: eval {out['eval_loss'][-1]:.4f} up {out['uplink'][-1]:,.0f} B", flush=True)
        yield out


def run_lora(meth: Any, row: dict, lr: float, args: argparse.Namespace, train: list, evalset: list,
             eval_cfg: m.FitConfig, tmp: Path, v0: dict) -> Iterator[dict]:
    """FedAvg of the adapters' differences (dense float32 both ways: the adapter mode's uplink encoder,
    the global as a float32 snapshot ``GlobalModel``)."""
    glob = {k: v.copy() for k, v in v0.items()}
    encoders = [UplinkEncoder(FP32_UP, None, None) for _ in range(N_CLIENTS)]
    out: dict[str, list] = {"eval_loss": [], "uplink": [], "downlink": []}
    for rnd in range(1, args.rounds + 1):
        deltas, ups = [], []
        for i in range(N_CLIENTS):
            meth.set_adapter(glob)
            res = meth.fit(train[i], fit_config(args, lr, rnd))
            local = meth.get_adapter()
            upd = _update(rnd, i, res.num_samples, encoders[i], {k: local[k] - glob[k] for k in glob}, None)
            ups.append(len(upd.to_msgpack()))
            deltas.append((res.num_samples, upd.tensors.decode_dense(max_elements=1 << 28)))
        total = sum(n for n, _ in deltas)
        glob = {k: (glob[k] + sum(np.float64(n / total) * d[k] for n, d in deltas)).astype(np.float32) for k in glob}
        gm = m.GlobalModel(version=rnd, round=rnd, adapter=meth.adapter_spec, tensors=encode(glob, CodecSpec()))
        out["downlink"].append(len(gm.to_msgpack()) + len(_task(rnd, None).to_msgpack()))
        out["uplink"].append(float(np.mean(ups)))
        meth.set_adapter(glob)
        out["eval_loss"].append(float(meth.evaluate(evalset, eval_cfg)[0]))
        print(f"    round {rnd}: eval {out['eval_loss'][-1]:.4f} up {out['uplink'][-1]:,.0f} B", flush=True)
        yield out


def _why(args: argparse.Namespace, results: list[dict]) -> str:
    """What explains the figures (computed from the run where it can be)."""
    krso = [r for r in results if r["kind"] == "krso"]
    used = sorted({n for r in krso for rnd in r["best"].get("seeds_used", []) for n in rnd})
    intervals = -(-args.local_steps // args.interval)
    edge = [r["name"] for r in results if r["best"]["lr"] in (r["lrs"][0], r["lrs"][-1])]
    return (
        f"Why: FedKRSO's uplink is (distinct seeds a client used) × r × Σ d_out values; here "
        f"{intervals} intervals per round drew {'/'.join(map(str, used))} distinct seeds per client, against "
        "LoRA-all-linear's r × (Σ d_in + Σ d_out) (on SmolLM2-135M Σ d_in ≈ Σ d_out, so one seed per round "
        "is about half of dense LoRA and two seeds about equal: the uplink target holds for at most ~2 "
        "seeds per round, e.g. J = local steps). Peak step memory: both hold the float32 base; FedKRSO "
        "trains B (d_out × r) per linear against LoRA's A and B, keeps P_s (r × d_in) and one accumulator "
        "per seed used, and its process has numba imported for applying rounds (the compiled kernel, "
        "~86 MB more once a round has been applied, is not in this probe). Step time: a FedKRSO step is "
        "LoRA's forward and backward plus, at each interval's end, W += B P_s for every linear; with "
        "J = 1 that merge runs every step. Times on this shared machine vary by 2× between identical runs "
        "(FedKRSO r=4 and r=8 do the same work but for r), so the step-time ratios are indicative only. "
        + (f"Best learning rate at the edge of its sweep: {', '.join(edge)} (a wider sweep might do better). "
           if edge else "")
        + "FedKSeed moves little in so few steps (it needs thousands) and its largest lr overshoots by round 2."
    )


def _final(run: dict) -> float:
    x = run["eval_loss"][-1]
    return x if np.isfinite(x) else float("inf")


def _update(rnd: int, i: int, n: int, enc: UplinkEncoder, arrays: dict, payload: Any) -> m.Update:
    def size_of(e: Any) -> int:
        return len(m.Update(kind="fit", task_id=f"r{rnd}", round=rnd, device_id=f"dev-{i}", base_version=rnd - 1,
                            num_samples=n, tensors=e, payload=payload).to_msgpack())

    tensors, _ = enc.encode(arrays, size_of)
    return m.Update(kind="fit", task_id=f"r{rnd}", round=rnd, device_id=f"dev-{i}", base_version=rnd - 1,
                    num_samples=n, tensors=tensors, payload=payload)


def _task(rnd: int, payload: Any) -> m.Task:
    return m.Task(kind="fit", task_id=f"r{rnd}-fit", round=rnd, device_id="dev-0", global_version=rnd - 1,
                  deadline_s=600, adapter=m.AdapterSpec(), payload=payload)


# -- the probe: peak memory and time of local steps, one process per method ----------------------------
def probe(name: str, args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from edge_agent.memory import configure_allocator, meter

    configure_allocator()
    row = ROWS[name]
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-krso-probe-") as tmp_s:
        train, _ = federated_data(Path(tmp_s), N_CLIENTS, args.samples, args.eval_samples)
    meth = build(row, resolve_model("smollm2-135m"))
    cfg = fit_config(args, row["lrs"][1], 1).model_copy(update={"local_steps": args.probe_steps})
    kw: dict[str, Any] = {}
    if row["kind"] == "krso":
        spec = krso_spec(row, args)
        kw = {"spec": spec, "seeds": K.candidate_seeds(K.round_seed(spec.seed, 1), spec.num_seeds)}
    elif row["kind"] == "zo":
        kw = {"spec": zo_spec(row["lrs"][1])}
    meth.fit(train[0], cfg.model_copy(update={"local_steps": 1}), **kw)  # warm-up: caches, first-call costs
    from edge_agent.methods.base import release_memory

    release_memory()
    before = meter().rss_mb()
    meter().reset()
    stamps = [time.perf_counter()]
    meth.fit(train[0], cfg, progress=lambda step, loss: stamps.append(time.perf_counter()), **kw)
    peak = meter().host_peak_mb()
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return {"name": name, "rss_before_mb": before, "peak_mb": peak, "step_s": statistics.median(steps),
            "steps_s": steps, "trainable": meth.num_trainable_params(), "threads": args.threads}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--local-steps", type=int, default=2)
    ap.add_argument("--interval", type=int, default=1, help="FedKRSO J")
    ap.add_argument("--num-seeds", type=int, default=4, help="FedKRSO K")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--max-seq-len", type=int, default=48)
    ap.add_argument("--samples", type=int, default=8, help="training examples per client")
    ap.add_argument("--eval-samples", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--probe-steps", type=int, default=2)
    ap.add_argument("--rows", nargs="*", default=list(ROWS))
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true",
                    help="rewrite the docs section from bench/results/krso.json (no training)")
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    if args.probe:
        print("PROBE " + json.dumps(probe(args.probe, args)), flush=True)
        return 0
    if args.render:
        from bench.report import RESULTS

        rec = json.loads((RESULTS / "krso.json").read_text())
        report(argparse.Namespace(**{**rec["args"], "no_doc": False}), rec["baseline_eval_loss"], rec["results"],
               rec["seconds"], recorded={"command": rec["command"], "machine": rec["machine"]})
        return 0

    t_start = time.perf_counter()
    probes = {}
    for name in args.rows:
        cmd = [sys.executable, __file__, "--probe", name, *sys.argv[1:]]
        res = subprocess.run(cmd, capture_output=True, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        line = next((x for x in res.stdout.splitlines() if x.startswith("PROBE ")), None)
        if line is None:
            raise RuntimeError(f"probe {name} failed: {res.stderr[-2000:]}")
        probes[name] = json.loads(line[6:])
        print(f"probe {name}: peak {probes[name]['peak_mb']:.0f} MiB, step {probes[name]['step_s']:.2f}s", flush=True)

    import torch

    torch.set_num_threads(args.threads)
    model_path = resolve_model("smollm2-135m")
    eval_cfg = fit_config(args, 1e-3).model_copy(update={"batch_size": args.eval_samples})
    results = []
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-krso-") as tmp_s:
        tmp = Path(tmp_s)
        train, evalset = federated_data(tmp, N_CLIENTS, args.samples, args.eval_samples)
        methods: dict[tuple, Any] = {}
        baseline = None
        for name in args.rows:
            row = ROWS[name]
            key = (row["kind"], row.get("targets"))
            if key not in methods:
                methods.clear()  # one model in memory at a time
                methods[key] = build(row, model_path)
            meth = methods[key]
            base_file = tmp / f"{row['kind']}-base.pt"
            if row["kind"] in ("krso", "zo") and not base_file.exists():
                meth.snapshot(base_file)
            v0 = meth.get_adapter() if row["kind"] == "lora" else None
            if baseline is None:
                baseline = float(meth.evaluate(evalset, eval_cfg)[0])
                print(f"baseline eval loss {baseline:.4f}", flush=True)
            # the sweep: round 1 at each lr; the best lr's federation then runs to the last round
            gens, runs = [], []
            for lr in row["lrs"]:
                t0 = time.perf_counter()
                print(f"{name} lr={lr}", flush=True)
                if row["kind"] == "krso":
                    g = run_krso(meth, row, lr, args, train, evalset, eval_cfg, tmp, base_file)
                elif row["kind"] == "zo":
                    g = run_zo(meth, lr, args, train, evalset, eval_cfg, tmp, base_file)
                else:
                    g = run_lora(meth, row, lr, args, train, evalset, eval_cfg, tmp, v0)
                r = next(g)
                r["lr"], r["seconds"] = lr, time.perf_counter() - t0
                gens.append(g)
                runs.append(r)
            i_best = min(range(len(runs)), key=lambda j: _final(runs[j]))
            t0 = time.perf_counter()
            print(f"{name}: best lr {runs[i_best]['lr']} after round 1; rounds 2..{args.rounds}", flush=True)
            for _ in gens[i_best]:  # the run's dict fills up round by round
                pass
            runs[i_best]["seconds"] += time.perf_counter() - t0
            best = runs[i_best]
            results.append({"name": name, **{k: v for k, v in row.items() if k != "lrs"}, "lrs": list(row["lrs"]),
                            "runs": runs, "best": best, "probe": probes.get(name)})
    report(args, baseline, results, time.perf_counter() - t_start)
    return 0


def report(args: argparse.Namespace, baseline: float | None, results: list[dict], seconds: float,
           recorded: dict | None = None) -> None:
    """Write the JSON and the docs section (``recorded``: the command and machine of a run being
    re-rendered from its JSON with ``--render``)."""
    by = {r["name"]: r for r in results}
    lora_all = by.get(LORA_ALL)
    rows = []
    for r in results:
        b, p = r["best"], r["probe"] or {}
        rows.append([r["name"], f"{b['lr']:g}",
                     " → ".join(f"{x:.4f}" for x in [baseline, *b["eval_loss"]]),
                     " / ".join(f"{r2['lr']:g}: {r2['eval_loss'][0]:.4f}" for r2 in r["runs"]),
                     f"{np.mean(b['uplink']):,.0f}", f"{np.mean(b['downlink']):,.0f}",
                     f"{p.get('peak_mb', float('nan')):.0f}", f"{p.get('step_s', float('nan')):.2f}"])
    targets = []
    if lora_all is not None:
        lp = lora_all["probe"] or {}
        best_lora = min((x for x in results if x["kind"] == "lora"), key=lambda x: x["best"]["eval_loss"][-1])
        for r in (x for x in results if x["kind"] == "krso"):
            b, p = r["best"], r["probe"] or {}
            same_r = next((x for x in results if x["kind"] == "lora" and x["r"] == r["r"] and len(x["targets"]) == 7),
                          None)
            t = {"name": r["name"],
                 "loss_vs_best_lora": b["eval_loss"][-1] - best_lora["best"]["eval_loss"][-1],
                 "best_lora": best_lora["name"],
                 "peak_vs_lora_all": p.get("peak_mb", np.nan) / lp.get("peak_mb", np.nan),
                 "step_vs_lora_all": p.get("step_s", np.nan) / lp.get("step_s", np.nan),
                 "uplink_vs_dense_lora_all_same_r": (np.mean(b["uplink"]) / np.mean(same_r["best"]["uplink"])
                                                     if same_r else None)}
            targets.append(t)
    out = {"benchmark": "krso", "command": command_line(), "machine": machine(), "args": vars(args),
           "seconds": seconds, "baseline_eval_loss": baseline, "results": results, "targets": targets,
           **(recorded or {})}
    write_json("krso", out)
    if args.no_doc:
        return
    lines = []
    for t in targets:
        ul = t["uplink_vs_dense_lora_all_same_r"]
        lines.append(
            f"- **{t['name']}**: final loss {t['loss_vs_best_lora']:+.4f} vs the best LoRA row ({t['best_lora']}) "
            f"({'met' if t['loss_vs_best_lora'] <= 0 else 'missed'}); peak step memory {t['peak_vs_lora_all']:.3f}× "
            f"LoRA-all-linear ({'met' if t['peak_vs_lora_all'] <= 1.15 else 'missed'}, target ≤ 1.15×); "
            + (f"uplink {ul:.2f}× dense LoRA-all-linear at r=8 ({'met' if ul <= 1 else 'missed'}); "
               if ul is not None else "uplink: no LoRA row at the same r; ")
            + f"step time {t['step_vs_lora_all']:.2f}× LoRA-all-linear "
            f"({'met' if t['step_vs_lora_all'] <= 1.3 else 'missed'}, target ≤ 1.3×).")
    md = (
        "## FedKRSO vs FedAvg LoRA vs FedKSeed (`bench/krso.py`)\n\n"
        f"`{out['command']}` ({seconds / 60:.1f} min) — SmolLM2-135M-Instruct, float32 base, CPU, "
        f"{args.threads} thread(s) per process; {N_CLIENTS} clients with non-IID synthetic data "
        f"({args.samples} examples each), "
        f"{args.rounds} rounds × {args.local_steps} local steps (batch {args.batch_size}, ≤{args.max_seq_len} "
        f"tokens), the same seeds for every row; held-out loss on {args.eval_samples} examples. FedKRSO: K = "
        f"{args.num_seeds} seeds per round, J = {args.interval} steps per interval, every linear of the blocks; "
        "FedKSeed: K = 1024, eps 1e-3. Learning rates: round 1 ran at 3 values per method (their round-1 losses "
        "listed); the best continued to the last round (the row). "
        "Bytes: dense float32 uplink for every row (the encoded msgpack `Update`), downlink per round per client "
        "(FedKRSO / FedKSeed: the ledger round plus the task; LoRA: the float32 global snapshot). Memory: the "
        "kernel's high-water mark of a separate process over "
        f"{args.probe_steps} local steps after a warm-up step (the model, optimizer and activations included); "
        f"time: the median of those steps. {out['machine']['cores']} cores shared with other jobs, "
        f"{out['machine']['date']}, commit {out['machine']['commit']}. Sizes were chosen for ~12 minutes on "
        "this machine (the wall time above includes other jobs' load): the losses compare methods at equal "
        "(short) budgets, not converged quality.\n\n"
        + md_table(["row", "best lr", "eval loss, base → each round (best lr)", "round-1 loss per lr",
                    "uplink B/round/client", "downlink B/round/client", "peak step MiB", "s/step"], rows)
        + "\n\nTargets (FedKRSO vs LoRA):\n" + "\n".join(lines) + "\n\n" + _why(args, results) + "\n"
    )
    update_doc_section("krso", md)


if __name__ == "__main__":
    sys.exit(main())
