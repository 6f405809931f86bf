"""A small student from a cached model: keep a subset of its blocks, heal them by distillation.

A model cut to some of its blocks is not a working language model (SmolLM2-135M cut to its first 10
of 30 blocks: answer loss ~30 against ~5.6 for the full model; bench/kd_student.py). ``shrink``:

1. **cut**: keep ``blocks`` decoder blocks of the teacher (``layout``: ``first`` = the first N,
   ``spread`` = N evenly spaced, the first and the last always kept), embeddings, final norm and
   head unchanged (the tokenizer is the teacher's, so the student can join a KD federation);
2. **corpus**: generic text the teacher writes itself: chat turns answering neutral seed prompts
   (topics × instructions built in code, no task data), sampled with a fixed seed. Text from the
   teacher is in its own tokenizer, chat format and distribution, needs no download, and shares
   nothing with any training or evaluation set;
3. **heal**: AdamW on the student's blocks and final norm (embeddings and the tied head frozen:
   they are the teacher's), loss = T² · KL(teacher ‖ student) at every token of the text at
   temperature T (the teacher's top-k logits per token, computed once and renormalised) plus
   ``lm_weight`` × the next-token loss; warm-up then cosine decay;
4. **save**: a normal HF checkpoint in the fedmq cache (``<cache>/models/<teacher dir>-shrunk<N>/``),
   built once under the cache's lock and reused, with ``shrink.json``: how it was made (teacher
   checkpoint hash, kept blocks, steps, seed, corpus, losses, KL before and after on held-out text).

``resolve_model("<model>:shrunk=N")`` builds it with the default recipe when missing;
``fedmq model shrink`` builds it with a chosen one. torch / transformers are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST = "shrink.json"
SHRUNK_SUFFIX = ":shrunk="
LAYOUTS = ("first", "spread")

_TOPICS = (
    "the weather", "cooking pasta", "a walk in the park", "how bicycles work", "the ocean", "trees",
    "learning a language", "a small town", "music", "the moon", "coffee", "a library", "rain", "trains",
    "gardening", "the history of paper", "birds", "a mountain", "friendship", "computers", "the sun",
    "bread", "winter", "a museum", "rivers", "painting", "sleep", "the city at night", "tea", "bees",
)
_INSTRUCTIONS = (
    "Write a short paragraph about {}.", "Explain {} to a child.", "Give three facts about {}.",
    "Describe {} in a few sentences.", "What is interesting about {}?", "Write a short story about {}.",
    "List some words related to {}.", "Why do people like {}?",
)


@dataclass(frozen=True)
class Recipe:
    """How a student is made (recorded in its manifest)."""

    blocks: int
    layout: str = "spread"
    steps: int = 64
    batch_size: int = 4
    lr: float = 5e-4
    warmup: int = 3
    temperature: float = 2.0
    lm_weight: float = 0.5
    top_k: int = 64  # the teacher's distribution per token, kept once (its k largest logits)
    texts: int = 28  # corpus size (teacher-written chat turns)
    held_out: int = 4  # of those, kept out of training to measure the KL
    new_tokens: int = 40  # tokens the teacher writes per text
    seed: int = 0

    def check(self, n_total: int) -> None:
        if not 1 <= self.blocks < n_total:
            raise ValueError(f"shrink: blocks must be in 1..{n_total - 1} (the teacher has {n_total}), "
                             f"got {self.blocks}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"shrink: layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        for key in ("steps", "batch_size", "texts", "new_tokens", "top_k"):
            if getattr(self, key) < 1:
                raise ValueError(f"shrink: {key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.held_out < self.texts:
            raise ValueError(f"shrink: held_out must be in 0..texts-1, got {self.held_out}")
        if self.lr <= 0 or self.temperature <= 0 or self.lm_weight < 0:
            raise ValueError("shrink: lr and temperature must be > 0 and lm_weight >= 0")


def split_shrunk(name: str) -> tuple[str, int | None]:
    """``("smollm2-135m", 15)`` for ``"smollm2-135m:shrunk=15"``; ``(name, None)`` without it."""
    base, sep, n = name.rpartition(SHRUNK_SUFFIX)
    if not sep:
        return name, None
    if not n.isdigit() or int(n) < 1 or not base.strip():
        raise ValueError(f"model {name!r}: expected '<model>{SHRUNK_SUFFIX}N' with N >= 1")
    return base.strip(), int(n)


def shrunk_dir(base: Path, blocks: int) -> Path:
    """Where the student of ``base`` (a checkpoint in ``<cache>/models``) with ``blocks`` blocks lives."""
    return base.parent / f"{base.name}-shrunk{blocks}"


def select_blocks(n_total: int, n_keep: int, layout: str) -> list[int]:
    """The indices of the blocks kept: ``first`` N, or N ``spread`` evenly (first and last kept)."""
    if not 1 <= n_keep <= n_total:
        raise ValueError(f"cannot keep {n_keep} of {n_total} blocks")
    if layout == "first" or n_keep == n_total:
        return list(range(n_keep))
    if layout != "spread":
        raise ValueError(f"unknown layout {layout!r}; use one of {', '.join(LAYOUTS)}")
    if n_keep == 1:
        return [n_total - 1]
    return sorted({round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)})


def cut(model: Any, keep: list[int]) -> Any:
    """``model`` (a decoder-only HF model) reduced in place to the blocks ``keep``, config updated."""
    import torch

    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[i] for i in keep])
    for j, layer in enumerate(model.model.layers):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = j  # the KV cache is indexed by position in the list
    types = getattr(model.config, "layer_types", None)
    if isinstance(types, list):
        model.config.layer_types = [types[i] for i in keep]
    model.config.num_hidden_layers = len(keep)
    return model


def seed_prompts(n: int, seed: int) -> list[str]:
    """``n`` neutral prompts (topic × instruction), drawn with ``seed``."""
    rng = random.Random(f"fedmq-shrink-{seed}")
    return [rng.choice(_INSTRUCTIONS).format(rng.choice(_TOPICS)) for _ in range(n)]


def teacher_corpus(teacher: Any, tok: Any, recipe: Recipe) -> list[list[int]]:
    """Token ids of ``recipe.texts`` texts: a neutral prompt (chat-templated when the tokenizer has a
    template) and what the teacher samples after it (``new_tokens``, temperature 0.8, top-p 0.95,
    torch seeded with ``recipe.seed``; batches of 16, left-padded)."""
    import torch

    prompts = seed_prompts(recipe.texts, recipe.seed)
    chat = bool(getattr(tok, "chat_template", None))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out: list[list[int]] = []
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(recipe.seed)
        for s in range(0, len(prompts), 16):
            ids_list = []
            for p in prompts[s:s + 16]:
                if chat:
                    text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                   add_generation_prompt=True)
                    ids_list.append(list(tok(text, add_special_tokens=False)["input_ids"]))
                else:
                    ids_list.append(list(tok(p + "\n")["input_ids"]))
            width = max(len(x) for x in ids_list)
            ids = torch.full((len(ids_list), width), pad, dtype=torch.long)
            attn = torch.zeros_like(ids)
            for i, x in enumerate(ids_list):
                ids[i, width - len(x):] = torch.tensor(x)
                attn[i, width - len(x):] = 1
            gen = teacher.generate(input_ids=ids, attention_mask=attn, max_new_tokens=recipe.new_tokens,
                                   do_sample=True, temperature=0.8, top_p=0.95, pad_token_id=pad)
            for i, x in enumerate(ids_list):
                new = gen[i, width:].tolist()
                if tok.eos_token_id in new:  # keep the end of turn, drop what follows
                    new = new[:new.index(tok.eos_token_id) + 1]
                out.append(x + [t for t in new if t != pad or t == tok.eos_token_id])
    return out


def _batch(rows: list[list[int]], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        attn[i, :len(r)] = 1
    return ids, attn


def distill_loss(student: Any, teacher: Any, rows: list[list[int]], pad: int, temperature: float,
                 lm_weight: float) -> tuple[Any, float, float]:
    """(loss, KL, LM loss) on ``rows``: T²·KL(teacher_T ‖ student_T) per token (mean over the real
    tokens) + ``lm_weight`` × the next-token cross-entropy; KL reported at T as trained."""
    import torch
    import torch.nn.functional as F

    ids, attn = _batch(rows, pad)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids, attention_mask=attn).logits.float()
    s_logits = student(input_ids=ids, attention_mask=attn).logits.float()
    mask = attn.bool()
    t_logp = F.log_softmax(t_logits[mask] / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits[mask] / temperature, dim=-1)
    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    nxt_mask = mask[:, 1:]
    lm = F.cross_entropy(s_logits[:, :-1][nxt_mask], ids[:, 1:][nxt_mask])
    loss = temperature ** 2 * kl + lm_weight * lm
    return loss, float(kl.detach()), float(lm.detach())


def mean_kl(student: Any, teacher: Any, rows: list[list[int]], pad: int, temperature: float = 1.0) -> float:
    """Mean per-token KL(teacher ‖ student) at ``temperature`` over ``rows`` (batches of 4)."""
    import torch

    if not rows:
        return float("nan")
    total, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(rows), 4):
            part = rows[s:s + 4]
            _, kl, _ = distill_loss(student, teacher, part, pad, temperature, 0.0)
            k = sum(len(r) for r in part)
            total, n = total + kl * k, n + k
    return total / n


def teacher_topk(teacher: Any, corpus: list[list[int]], pad: int, k: int) -> list[tuple[Any, Any]]:
    """Per text: the teacher's ``k`` largest logits at every position, (ids, logits) — computed once,
    so healing runs the teacher a single time per text."""
    import torch

    out: list[tuple[Any, Any]] = []
    with torch.no_grad():
        for s in range(0, len(corpus), 4):
            part = corpus[s:s + 4]
            ids, attn = _batch(part, pad)
            logits = teacher(input_ids=ids, attention_mask=attn).logits.float()
            vals, idx = logits.topk(k, dim=-1)
            for i, r in enumerate(part):
                out.append((idx[i, :len(r)].clone(), vals[i, :len(r)].clone()))
    return out


def topk_distill_loss(student: Any, rows: list[list[int]], targets: list[tuple[Any, Any]], pad: int,
                      temperature: float, lm_weight: float) -> tuple[Any, float, float]:
    """As ``distill_loss`` with the teacher's distribution restricted to its top-k ids (renormalised):
    T²·Σ_topk q (log q − log s) per token + ``lm_weight`` × the next-token cross-entropy."""
    import torch
    import torch.nn.functional as F

    ids, attn = _batch(rows, pad)
    s_logits = student(input_ids=ids, attention_mask=attn).logits.float()
    mask = attn.bool()
    t_ids = torch.cat([t[0] for t in targets])
    q_logp = F.log_softmax(torch.cat([t[1] for t in targets]) / temperature, dim=-1)
    s_logp = F.log_softmax(s_logits[mask] / temperature, dim=-1).gather(-1, t_ids)
    kl = (q_logp.exp() * (q_logp - s_logp)).sum(-1).mean()
    nxt_mask = mask[:, 1:]
    lm = F.cross_entropy(s_logits[:, :-1][nxt_mask], ids[:, 1:][nxt_mask])
    return temperature ** 2 * kl + lm_weight * lm, float(kl.detach()), float(lm.detach())


def heal(student: Any, teacher: Any, corpus: list[list[int]], pad: int, recipe: Recipe,
         log: Any = print) -> list[float]:
    """Train ``student`` towards ``teacher`` on ``corpus`` (see the module doc). Returns the losses."""
    import torch

    targets = teacher_topk(teacher, corpus, pad, recipe.top_k)
    frozen = {id(p) for p in student.get_input_embeddings().parameters()}
    frozen |= {id(p) for p in student.get_output_embeddings().parameters()}
    params = [p for p in student.parameters() if id(p) not in frozen]
    for p in student.parameters():
        p.requires_grad_(id(p) not in frozen)
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        t = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = random.Random(f"fedmq-shrink-batches-{recipe.seed}")
    order: list[int] = []
    losses: list[float] = []
    student.train()
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        for step in range(recipe.steps):
            while len(order) < recipe.batch_size:
                fresh = list(range(len(corpus)))
                rng.shuffle(fresh)
                order += fresh
            pick = [order.pop() for _ in range(recipe.batch_size)]
            loss, kl, lm = topk_distill_loss(student, [corpus[i] for i in pick], [targets[i] for i in pick], pad,
                                             recipe.temperature, recipe.lm_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if (step + 1) % 5 == 0 or step + 1 == recipe.steps:
                log(f"heal step {step + 1}/{recipe.steps}: loss {losses[-1]:.3f} (KL {kl:.3f}, LM {lm:.3f}), "
                    f"{time.perf_counter() - t0:.0f} s")
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    return losses


def checkpoint_sha256(path: Path) -> str:
    """SHA-256 over the checkpoint's weight files (sorted by name) and its config.json."""
    h = hashlib.sha256()
    for f in [*sorted(path.glob("*.safetensors")), path / "config.json"]:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def build_student(base: Path, recipe: Recipe, out_dir: Path, log: Any = print) -> dict:
    """Cut, heal and save the student of the checkpoint at ``base`` into ``out_dir`` (with its
    manifest, which is returned)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(base))
    teacher = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    n_total = len(teacher.model.layers)
    recipe.check(n_total)
    keep = select_blocks(n_total, recipe.blocks, recipe.layout)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    log(f"shrink {base.name}: keeping blocks {keep} of {n_total}; the teacher writes {recipe.texts} texts")
    corpus = teacher_corpus(teacher, tok, recipe)
    train, held = corpus[recipe.held_out:], corpus[:recipe.held_out]
    student = cut(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), keep).eval()
    kl_before = mean_kl(student, teacher, held, pad)
    log(f"held-out KL to the teacher before healing: {kl_before:.3f}")
    losses = heal(student, teacher, train, pad, recipe, log)
    kl_after = mean_kl(student, teacher, held, pad)
    log(f"held-out KL to the teacher after {recipe.steps} steps: {kl_after:.3f}")
    student.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    tail = losses[-10:]
    manifest = {
        "teacher": base.name, "teacher_sha256": checkpoint_sha256(base), "teacher_blocks": n_total,
        "kept_blocks": keep, "recipe": asdict(recipe),
        "corpus": (f"{len(corpus)} texts the teacher wrote (sampled, T=0.8, top-p 0.95, seed {recipe.seed}) "
                   "after neutral topic prompts; none of any training or evaluation set"),
        "corpus_tokens": sum(len(r) for r in train), "held_out_kl_before": kl_before,
        "held_out_kl_after": kl_after, "first_loss": losses[0], "final_loss": sum(tail) / len(tail),
        "seconds": time.perf_counter() - t0,
    }
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(path: str | Path) -> dict | None:
    """The ``shrink.json`` of a student checkpoint, or None."""
    f = Path(path) / MANIFEST
    return json.loads(f.read_text()) if f.is_file() else None
