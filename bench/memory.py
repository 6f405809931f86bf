"""Memory budgets: the plan each budget gets, its estimate, and the peak actually measured.

For each host budget, a fresh process (nothing shared between budgets) does what an agent does:
plans with ``edge_agent.memory.MemoryManager`` (SmolLM2-135M-Instruct's config, the
round's batch and window), loads the planned method, and trains a few local steps under the
runtime guard on examples that fill the window. Measured: the process's peak resident set over its
whole life (Linux ``VmHWM``, folded across the guard's per-step resets), including imports and
loading; the load peak and the highest step peak. A budget with no plan is refused before torch is
even imported: its process's peak is what refusing costs.

    python bench/memory.py                       # 600 MB, 1 GB, 2 GB, 4 GB; batch 8 × 128 tokens
    python bench/memory.py --budgets 1024 --steps 3 --no-doc
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.report import command_line, machine, md_table, update_doc_section, write_json

BUDGETS_MB = (600, 1024, 2048, 4096)
TARGET_ERROR = 0.15
# The points the estimate's constants were fitted to (edge_agent/memory/estimator.py): the highest step
# peak (VmHWM, MiB) of 3-4 steps of the method classes on SmolLM2-135M-Instruct, LoRA r=8 on
# q_proj/v_proj, rows filling the window, glibc mmap threshold fixed, one process per point,
# measured on this machine while calibrating: (method, base, micro-batch, seq, checkpointing) -> MiB.
CALIBRATION = [
    (("lora", "float32", 1, 128, False), 1296), (("lora", "float32", 4, 128, False), 1967),
    (("lora", "float32", 1, 256, False), 1627), (("lora", "float32", 2, 256, True), 1407),
    (("lora", "float32", 4, 128, True), 1437), (("lora", "bfloat16", 2, 128, False), 1070),
    (("zo", "nf4", 2, 128, False), 738),
]


def _examples(n: int, seed: int = 0) -> list[dict]:
    """Instruction examples whose response fills a 128-token window (several synthetic answers
    joined), so every row of a batch is as long as the plan assumes."""
    from edge_agent.data import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        synthesize(tmp, num_devices=1, samples_per_device=8 * n, eval_samples=0, seed=seed)
        rows = [json.loads(line) for line in (Path(tmp) / "device_0.jsonl").read_text().splitlines()]
    out = []
    for i in range(n):
        part = rows[8 * i: 8 * i + 8]
        out.append({"prompt": part[0]["prompt"], "response": " ".join(r["response"] for r in part * 4)})
    return out


def child(args: argparse.Namespace) -> dict:
    """One budget, in this (fresh) process."""
    from edge_agent.memory import configure_allocator, meter

    configure_allocator()
    t_start = time.perf_counter()
    from edge_agent.config import AgentConfig
    from edge_agent.memory import MemoryManager, PlanRefused
    from edge_agent.models import resolve_model
    from fedmq_protocol.messages import AdapterSpec, FitConfig

    model_path = resolve_model(args.model, log=lambda _m: None)
    tmp = Path(tempfile.mkdtemp(prefix="fedmq-bench-memory-"))
    train = tmp / "train.jsonl"
    train.write_text("\n".join(json.dumps(e) for e in _examples(32)) + "\n")
    cfg = AgentConfig(device_id="bench", model=model_path, method=args.method, device="cpu",
                      data={"train": str(train)}, state_dir=str(tmp / "state"),
                      memory_budget={"host_mb": args.budget}, training={"torch_threads": args.threads})
    adapter = AdapterSpec(r=args.lora_r, alpha=2 * args.lora_r)
    fit = FitConfig(local_steps=args.steps, lr=2e-3, batch_size=args.batch_size, max_seq_len=args.max_seq_len, seed=1)
    mm = MemoryManager(cfg)
    mm.prepare(model_path, "cpu")
    out: dict = {"budget_mb": args.budget}
    try:
        plan = mm.plan_for(adapter, fit)
    except PlanRefused as exc:
        out.update(refused=str(exc), min_host_mb=mm.min_host_mb, peak_mb=meter().lifetime_host_mb(),
                   wall_s=time.perf_counter() - t_start)
        return out
    import torch

    from edge_agent.data import load_jsonl
    from edge_agent.memory import OverBudget
    from edge_agent.methods import get_method
    from edge_agent.methods.base import FitMemory

    torch.set_num_threads(args.threads)
    examples = load_jsonl(train)
    name, kwargs = plan.method_spec()
    meter().reset()
    t0 = time.perf_counter()
    method = get_method(name)(model_path, adapter, device="cpu", seed=0, **kwargs)
    load_s = time.perf_counter() - t0
    load_peak = meter().host_peak_mb()
    mm.load_measured(load_peak)
    plan_memory = FitMemory()
    mm.install(plan_memory)  # the plan's micro-batch and the guard, given to the fit
    lens = [len(method._encode(e, fit.max_seq_len)[0]) for e in examples]
    mm.fit_started()
    t0 = time.perf_counter()
    over = None
    try:
        result = method.fit(examples, fit, memory=plan_memory)
        steps, loss = result.steps, result.train_loss
    except OverBudget as exc:
        over, steps, loss = exc.figures(), exc.step - 1, float("nan")
    fit_s = time.perf_counter() - t0
    mm.fit_finished()
    g = mm.guard
    out.update(plan=plan.to_info(), label=plan.label(), estimate_mb=plan.estimate_host_mb,
               breakdown={k: round(v, 1) for k, v in plan.breakdown.items()},
               peak_mb=meter().lifetime_host_mb(), load_peak_mb=load_peak, step_peak_mb=g.round_peak_host_mb,
               steps=steps, train_loss=loss, over_budget=over, load_s=load_s, fit_s=fit_s,
               tokens_per_row=[min(lens), max(lens)], hwm_exact=meter().exact,
               wall_s=time.perf_counter() - t_start)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS_MB), help="host budgets, MiB")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="lora", choices=["lora", "qlora"])
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-seq-len", type=int, default=128)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-doc", action="store_true", help="do not rewrite docs/benchmarks.md")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite the docs/benchmarks.md section from bench/results/memory.json")
    ap.add_argument("--raw-out", help="write the runs to this JSON file only (merge later with --merge)")
    ap.add_argument("--merge", nargs="+", metavar="FILE",
                    help="build the results and the doc section from runs written by --raw-out")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args)), flush=True)
        return 0
    if args.report_only:
        from bench.report import RESULTS

        md = render(json.loads((RESULTS / "memory.json").read_text()))
        update_doc_section("memory", md)
        print(md)
        return 0

    runs = []
    if args.merge:
        for f in args.merge:
            runs += json.loads(Path(f).read_text())
        runs.sort(key=lambda r: r["budget_mb"])
    for budget in [] if args.merge else args.budgets:
        cmd = [sys.executable, __file__, "--child", "--budget", str(budget), "--model", args.model,
               "--method", args.method, "--batch-size", str(args.batch_size), "--max-seq-len", str(args.max_seq_len),
               "--lora-r", str(args.lora_r), "--steps", str(args.steps), "--threads", str(args.threads)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if p.returncode != 0 or line is None:
            sys.exit(f"budget {budget} MiB: child failed ({p.returncode}):\n{p.stderr[-3000:]}")
        r = json.loads(line[len("RESULT "):])
        r["threads"] = args.threads
        runs.append(r)
        print(json.dumps(r), flush=True)
    if args.raw_out:
        Path(args.raw_out).write_text(json.dumps(runs, indent=1))
        return 0

    for r in runs:
        r["within_budget"] = r["peak_mb"] <= r["budget_mb"]
        if "estimate_mb" in r:
            r["error"] = (r["estimate_mb"] - r["peak_mb"]) / r["peak_mb"]
    trained = [r for r in runs if "estimate_mb" in r]
    command = command_line()
    if args.merge:
        budgets = " ".join(str(r["budget_mb"]) for r in runs)
        command = (f"python bench/memory.py --budgets {budgets} --steps {args.steps}"
                   f" (budgets run by separate invocations with --raw-out, threads per run in the table; "
                   f"merged with --merge)")
    result = {"benchmark": "memory", "command": command, "machine": machine(), "args": vars(args),
              "runs": runs, "target_error": TARGET_ERROR,
              "all_within_budget": all(r["within_budget"] for r in runs),
              "max_abs_error": max((abs(r["error"]) for r in trained), default=None)}
    path = write_json("memory", result)

    md = render(result)
    if not args.no_doc:
        update_doc_section("memory", md)
    print(md)
    print(f"results: {path}")
    return 0


def render(result: dict) -> str:
    """The docs/benchmarks.md section of a result (also ``--report-only`` from the JSON)."""
    runs, err = result["runs"], result["max_abs_error"]
    a = argparse.Namespace(**result["args"])
    rows = []
    for r in runs:
        if "refused" in r:
            rows.append([r["budget_mb"], f"refused (needs ≥ {r['min_host_mb']:.0f} MiB)", "—", f"{r['peak_mb']:.0f}",
                         "—", "—", "yes" if r["within_budget"] else "**NO**", "—"])
            continue
        p = r["plan"]
        what = (f"{p['method']} ({p['base']} base{', ' + p['zo_target'] if p['zo_target'] else ''}), micro-batch "
                f"{p['micro_batch']} × {p['grad_accum']}" + (", checkpointing" if p["gradient_checkpointing"] else ""))
        status = f"{r['steps']} steps"
        if r["over_budget"]:
            status += f"; over budget at step {r['over_budget']['step']}"
        if r.get("threads"):
            status += f", {r['threads']} thread{'s' if r['threads'] > 1 else ''}, {r['fit_s']:.0f} s"
        rows.append([r["budget_mb"], what, f"{r['estimate_mb']:.0f}", f"{r['peak_mb']:.0f}",
                     f"{r['load_peak_mb']:.0f} / {r['step_peak_mb']:.0f}", f"{100 * r['error']:+.1f} %",
                     "yes" if r["within_budget"] else "**NO**", status])
    refused = [r for r in runs if "refused" in r]
    met_budget = result["all_within_budget"]
    lens = [n for r in runs for n in r.get("tokens_per_row", [])]
    rows_note = f"rows of {min(lens)}–{max(lens)} tokens" if lens else "rows"
    md = (
        f"## Memory budgets: plan, estimate, measured peak (`bench/memory.py`)\n\n"
        f"`{result['command']}` — {a.model}, agent method `{a.method}` (fallbacks: micro-batches with gradient "
        f"accumulation, gradient checkpointing, 4-bit NF4 base, zeroth-order on the adapter; a bfloat16 base is "
        f"offered on CUDA only), LoRA r={a.lora_r} on q_proj/v_proj, round batch "
        f"{a.batch_size} rows of ≤ {a.max_seq_len} tokens ({rows_note}; the estimate assumes full windows), "
        f"{a.steps} local steps; "
        f"each budget in its own process; CPU only (no GPU in this environment: "
        f"the CUDA path, `torch.cuda.max_memory_allocated` against `gpu_mb`, is not exercised here). "
        f"{result['machine']['cores']} cores, {result['machine']['date']}, commit {result['machine']['commit']}.\n\n"
        f"Measured peak: the process's peak resident set over its whole life (imports, load, training), from the "
        f"kernel's high-water mark (`VmHWM`, reset per step by the guard and folded). Load / step: the peaks of "
        f"loading the model and of the worst training step. Estimate: `edge_agent.memory.estimator` from the model's "
        f"config (runtime {runtime_note()}).\n\n"
        + md_table(["budget MiB", "plan", "estimate MiB", "measured peak MiB", "load / step MiB",
                    "estimate error", "peak ≤ budget", "training"], rows)
        + "\n\n"
        + "".join(f"Refused at {r['budget_mb']} MiB: “{r['refused']}”\n\n" for r in refused)
        + "Times are wall-clock on a 2-core machine shared with other jobs (load average 8–11 during these "
        "runs): the memory figures do not depend on load, the times are not representative.\n\n"
        + calibration_note(a.model)
        + f"Targets: measured peak ≤ budget in every case: **{'met' if met_budget else 'NOT met'}**; "
        + (f"|estimate − measured| ≤ 15 %: **{'met' if err is not None and err <= TARGET_ERROR else 'NOT met'}** "
           f"(worst {100 * err:.1f} %).\n" if err is not None else "no plan was trained.\n")
    )
    return md


def calibration_note(model: str) -> str:
    """The fit points of the estimate's constants, with today's estimate for each."""
    from edge_agent.memory import ModelShape, estimate
    from edge_agent.models import resolve_model

    shape = ModelShape.from_path(resolve_model(model, log=lambda _m: None))
    parts = []
    for (meth, base, mb, seq, ck), measured in CALIBRATION:
        est = estimate(shape, method=meth, base=base, micro_batch=mb, seq_len=seq, gradient_checkpointing=ck,
                       zo_target="lora" if meth == "zo" else None)[0]
        what = f"{meth} {base} {mb}×{seq}" + (" ckpt" if ck else "")
        parts.append(f"{what}: {measured} measured / {est:.0f} estimated ({100 * (est - measured) / measured:+.1f} %)")
    return ("Calibration points (step peaks measured while fitting the constants, 3-4 steps each, one process "
            "each; bfloat16 on this CPU ran 30× slower per step than float32, hence not a CPU fallback): "
            + "; ".join(parts) + ".\n\n")


def runtime_note() -> str:
    from edge_agent.memory import RUNTIME_MB

    return f"{RUNTIME_MB['cpu']:.0f} MiB for Python, torch, transformers, peft and the tokenizer, measured"


if __name__ == "__main__":
    raise SystemExit(main())
