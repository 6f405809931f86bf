"""How good a small student is before any federation: SmolLM2-135M, the same number of its blocks
cut two ways (the first N, N spread evenly) and the student healed from it by ``fedmq model shrink``
(``smollm2-135m:shrunk=N``), each evaluated before any training on the held-out rows of
bench/kd.py (the same synthetic families, seeds and sizes): answer-token loss (mean over families)
and exact match of the greedy answer. The healed student's manifest (recipe, held-out KL to the
teacher before and after healing on teacher-written text) is reported with it.

    OMP_NUM_THREADS=1 python bench/kd_student.py    # the recorded run (the student is built once, cached)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.compression import federated_data
from bench.kd import N, generate, raw_cut
from bench.report import command_line, machine, md_table, update_doc_section, write_json
from edge_agent.data import DEFAULT_FAMILIES, check_answer
from edge_agent.models import resolve_model
from edge_agent.shrink import read_manifest, select_blocks
from fedmq_protocol import messages as m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--samples", type=int, default=40, help="as bench/kd.py (the eval rows depend on it)")
    ap.add_argument("--eval-per-family", type=int, default=3)
    ap.add_argument("--max-seq-len", type=int, default=96)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from edge_agent.methods.kd import KdMethod

    t0 = time.perf_counter()
    full = resolve_model(args.model)
    student = resolve_model(f"{args.model}:shrunk={args.blocks}")
    made = read_manifest(student) or {}
    n_total = int(made.get("teacher_blocks") or 0)
    adapter = m.AdapterSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj"))
    cfg = m.FitConfig(local_steps=1, lr=1e-3, batch_size=16, max_seq_len=args.max_seq_len)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-kd-student-") as tmp_s:
        tmp = Path(tmp_s)
        _, evalset = federated_data(tmp, N, args.samples, args.eval_per_family * len(DEFAULT_FAMILIES))
        by_family = {f: [e for e in evalset if e.family == f] for f in DEFAULT_FAMILIES}
        models = [
            (f"{args.model} (all {n_total} blocks)", full),
            (f"first {args.blocks} blocks, raw cut",
             raw_cut(full, select_blocks(n_total, args.blocks, "first"), tmp / "first")),
            (f"{args.blocks} blocks spread, raw cut", raw_cut(full, made["kept_blocks"], tmp / "spread")),
            (f"{args.blocks} blocks spread, healed (`{args.model}:shrunk={args.blocks}`)", student),
        ]
        for name, path in models:
            t_row = time.perf_counter()
            meth = KdMethod(path, adapter, device="cpu", dtype="float32", seed=0)
            answers = generate(meth, evalset, args.max_new_tokens)
            ok = [check_answer(e, a) for e, a in zip(evalset, answers, strict=True)]
            loss = float(np.mean([meth.evaluate(by_family[f], cfg)[0] for f in DEFAULT_FAMILIES]))
            rows.append({"model": name, "params": sum(p.numel() for p in meth.model.parameters()),
                         "answer_loss": loss, "acc": float(np.mean(ok))})
            print(f"{name}: loss {loss:.3f} ({time.perf_counter() - t_row:.0f}s)", flush=True)
            del meth
    seconds = time.perf_counter() - t0
    ref = rows[0]["answer_loss"]
    for r in rows:
        r["loss_vs_full_x"] = r["answer_loss"] / ref
    out = {"benchmark": "kd-student", "command": command_line(), "machine": machine(), "args": vars(args),
           "seconds": seconds, "rows": rows, "student": made}
    path = write_json("kd-student", out)
    rc = made.get("recipe", {})
    md = (
        "## A small student for the mixed KD federation (`bench/kd_student.py`)\n\n"
        f"`{out['command']}` ({seconds / 60:.1f} min) — answer-token loss (mean over the {len(DEFAULT_FAMILIES)} "
        f"synthetic families, {args.eval_per_family} held-out rows each: bench/kd.py's eval rows) and exact match "
        "of the greedy answer, before any training. The healed student: `fedmq model shrink "
        f"{args.model} --blocks {args.blocks}` kept blocks {made.get('kept_blocks')} and trained them "
        f"{rc.get('steps')} AdamW steps (batch {rc.get('batch_size')}, lr {rc.get('lr')}, embeddings and head "
        f"frozen) on T²·KL to the teacher's top-{rc.get('top_k')} (T={rc.get('temperature')}) + "
        f"{rc.get('lm_weight')} × LM loss over {int(rc.get('texts', 0)) - int(rc.get('held_out', 0))} texts the "
        f"teacher wrote after neutral prompts (seed {rc.get('seed')}; {made.get('corpus_tokens')} tokens), in "
        f"{made.get('seconds', 0) / 60:.1f} min on the shared cores; KL to the teacher on "
        f"{rc.get('held_out')} held-out teacher texts {made.get('held_out_kl_before', float('nan')):.2f} → "
        f"{made.get('held_out_kl_after', float('nan')):.2f}. {out['machine']['cores']} cores shared with other "
        f"jobs, {out['machine']['date']}, commit {out['machine']['commit']}.\n\n"
        + md_table(["model", "parameters", "answer loss", "vs full", "exact match"],
                   [[r["model"], f"{r['params']:,}", f"{r['answer_loss']:.3f}", f"{r['loss_vs_full_x']:.2f}×",
                     f"{r['acc']:.2f}"] for r in rows])
        + f"\n\nHealing changed the spread cut's answer loss by "
        f"{100 * (rows[3]['answer_loss'] / rows[2]['answer_loss'] - 1):+.1f} % "
        f"({rows[2]['answer_loss']:.3f} → {rows[3]['answer_loss']:.3f}) while its KL to the teacher on held-out "
        "teacher text fell as above; keeping blocks spread instead of the first N changes the raw cut's by "
        f"{100 * (rows[2]['answer_loss'] / rows[1]['answer_loss'] - 1):+.1f} %.\n"
    )
    if not args.no_doc:
        update_doc_section("kd-student", md)
    print(md)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
