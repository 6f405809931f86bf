"""Memory planning: estimate the peak memory of a training plan and pick the best plan that fits.

A *plan* is what a device will actually run for a round: the method (``lora`` on a float32 or
bfloat16 base, ``qlora`` on a 4-bit NF4 base, ``zo`` zeroth-order on all parameters or on the LoRA
adapter), the micro-batch with gradient accumulation up to the round's batch size, and gradient
checkpointing. ``choose_plan`` walks the plans from best (most faithful training, least recompute)
to cheapest and returns the first whose estimated peak fits the budget; when none fits it raises
``BudgetTooSmall`` naming the smallest budget that would work.

The estimate is arithmetic on the model's config (parameters, layers, hidden and intermediate
sizes, heads, vocabulary), not a trial run:

    host peak = runtime + weights + trainable state + activations + logits + attention + slack

* runtime: the Python process with torch, transformers, peft, bitsandbytes and the agent imported
  and the tokenizer loaded (measured, ``RUNTIME_MB``);
* weights: parameters × bytes of their dtype; NF4 linears take 0.5 byte per weight plus one
  8-bit absmax per 64 weights (double quantization), embeddings and norms keep the compute dtype;
* trainable state: LoRA parameters r·(in + out) per targeted module, with their gradient and the
  two AdamW moments (16 bytes per parameter in float32);
* activations, per token and layer, ``ACT_BYTES × (9·hidden + 3·intermediate)`` without
  checkpointing (what autograd keeps of a Llama-style layer with frozen linears: norm inputs,
  attention q/k/v/out, the SiLU gate and its product); with checkpointing only each layer's input
  is kept and one layer is recomputed at a time;
* logits: micro-batch × sequence × vocabulary × 4 bytes, ``LOGIT_COPIES`` times (logits, the
  loss's log-softmax and its gradient live together in backward);
* attention scores: micro-batch × heads × sequence² × 4 bytes per layer kept (``ATTN_COPIES``);
* slack: allocator fragmentation growing with the step's transient (``SLACK_FRACTION``) plus
  a constant (``SLACK_MB``).

The constants were calibrated against peaks measured on SmolLM2-135M-Instruct (CPU, torch 2.13,
glibc with a fixed mmap threshold, see ``edge_agent.memory_guard.configure_allocator``); the
figures are in docs/benchmarks.md (``bench/memory.py``). GPU estimates use the same arithmetic
in the compute dtype and a CUDA context allowance; they were not calibrated here (no GPU).

This module imports neither torch nor transformers: the coordinator, tests and the CLI may use it.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

MB = 1024 * 1024

# --- calibration (CPU; see the module docstring and docs/benchmarks.md) ------------------------
RUNTIME_MB = {"cpu": 445.0, "cuda": 1300.0}  # process with torch/transformers/peft + tokenizer
ACT_BYTES = 2.56         # bytes per (9·h + 3·I) element of a layer's saved activations
LOGIT_COPIES = 3.1       # float32 logits-sized buffers alive together at the loss / its backward
ATTN_COPIES = 3.0        # (heads × seq²) buffers per layer kept by attention for backward
ZO_LOGIT_COPIES = 2.0    # inference: logits and the loss's log-softmax
SLACK_FRACTION = 0.0     # allocator fragmentation, share of a step's transient memory
SLACK_MB = 85.0          # optimizer bookkeeping, token caches, allocator arenas
CUDA_CONTEXT_MB = 500.0  # CUDA context and cuBLAS workspaces on the GPU (not calibrated here)
ZO_CHUNK_BYTES = 4 * (1 << 20)  # a float32 staging buffer of directions (edge_agent.methods.zo.STAGING_ELEMENTS)
ZO_KERNELS_MB = 141.0    # numba/LLVM and the compiled direction kernels (import 55 MB + compile 86 MB, measured)
NF4_BLOCK = 64           # bitsandbytes NF4 block size (one absmax per block)

METHODS = ("lora", "qlora", "zo")
# what a gradient-trained adapter federation accepts: every plan that trains the same LoRA adapter
ADAPTER_METHODS = ("lora", "qlora", "zo")


class BudgetTooSmall(ValueError):
    """No plan fits the memory budget. ``min_host_mb`` / ``min_gpu_mb``: the smallest budget of
    the cheapest plan (what the operator must configure at least)."""

    def __init__(self, message: str, *, min_host_mb: float | None, min_gpu_mb: float | None = None,
                 smallest: "Plan | None" = None) -> None:
        super().__init__(message)
        self.min_host_mb = min_host_mb
        self.min_gpu_mb = min_gpu_mb
        self.smallest = smallest


# --------------------------------------------------------------------------------------------
# sizes and budgets
# --------------------------------------------------------------------------------------------

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)
_UNIT_MB = {"K": 1 / 1024, "": 1.0, "M": 1.0, "G": 1024.0, "T": 1024.0 * 1024}


def parse_size_mb(value: Any, *, what: str = "memory", total_mb: float | None = None) -> float:
    """MiB from ``2048`` (a number of MiB), ``"2G"``, ``"2GB"``, ``"2GiB"``, ``"512M"`` or ``"80%"``
    (of ``total_mb``, the machine's RAM when not given). ValueError naming ``what`` otherwise."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what}: expected a size like 2G or a number of MB, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{what}: must be a positive number of MB, got {value!r}")
        return float(value)
    text = str(value).strip()
    if text.endswith("%"):
        try:
            share = float(text[:-1])
        except ValueError:
            share = -1.0
        if not 0 < share <= 100:
            raise ValueError(f"{what}: a share must be in (0, 100]%, got {value!r}")
        if total_mb is None:
            import psutil

            total_mb = psutil.virtual_memory().total / MB
        return total_mb * share / 100
    m = _SIZE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{what}: expected a size like 2G, 2GB, 512M or 80%, got {value!r}")
    return float(m.group(1)) * _UNIT_MB[(m.group(2) or "M").upper()]


@dataclass(frozen=True)
class Budget:
    """Memory a device may use: host RAM and (with CUDA) GPU memory, in MiB; None: unbounded."""

    host_mb: float | None = None
    gpu_mb: float | None = None

    @property
    def bounded(self) -> bool:
        return self.host_mb is not None or self.gpu_mb is not None

    def describe(self) -> str:
        parts = []
        if self.host_mb is not None:
            parts.append(f"{self.host_mb:.0f} MiB host")
        if self.gpu_mb is not None:
            parts.append(f"{self.gpu_mb:.0f} MiB GPU")
        return " + ".join(parts) or "no budget"


# --------------------------------------------------------------------------------------------
# model shape
# --------------------------------------------------------------------------------------------

def _first(cfg: Mapping[str, Any], *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a causal LM's config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    tie_word_embeddings: bool = True
    name: str = "model"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str = "model") -> "ModelShape":
        cfg = dict(cfg.get("text_config") or cfg)  # multimodal wrappers keep the LM in text_config
        h = _first(cfg, "hidden_size", "n_embd", "d_model")
        layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
        vocab = _first(cfg, "vocab_size")
        if not (h and layers and vocab):
            raise ValueError(f"{name}: config lacks hidden_size / num_hidden_layers / vocab_size")
        heads = int(_first(cfg, "num_attention_heads", "n_head", default=max(1, h // 64)))
        kv = int(_first(cfg, "num_key_value_heads", default=heads) or heads)
        head_dim = int(_first(cfg, "head_dim", default=h // heads) or h // heads)
        inter = int(_first(cfg, "intermediate_size", "n_inner", "ffn_dim", default=4 * h) or 4 * h)
        return cls(int(vocab), int(h), inter, int(layers), heads, kv, head_dim,
                   bool(cfg.get("tie_word_embeddings", True)), name)

    @classmethod
    def from_path(cls, path: str | Path) -> "ModelShape":
        """From a checkpoint directory (or its config.json); a hub id is asked of transformers
        (its local cache; imported only then)."""
        p = Path(path)
        cfg_file = p / "config.json" if p.is_dir() else p
        if not cfg_file.is_file() and "/" in str(path) and not p.exists():
            try:
                from transformers import AutoConfig

                return cls.from_config(AutoConfig.from_pretrained(str(path)).to_dict(), name=str(path))
            except Exception as exc:  # noqa: BLE001 - any failure means: no shape
                raise ValueError(f"cannot read the model config of {path}: {exc}") from None
        try:
            return cls.from_config(json.loads(cfg_file.read_text()), name=p.name)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the model config {cfg_file}: {exc}") from None

    # -- parameter counts -----------------------------------------------------------------------
    def module_dims(self, name: str) -> tuple[int, int]:
        """(in, out) features of a decoder-layer linear (Llama naming; others count as h × h)."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}.get(name, (h, h))

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linears (what NF4 quantizes)."""
        per_layer = sum(a * b for a, b in (self.module_dims(n) for n in
                        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
        return per_layer * self.num_layers

    @property
    def embed_params(self) -> int:
        """Input embeddings plus an untied output head (not quantized)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def other_params(self) -> int:
        """Norms: two per layer plus the final one."""
        return self.hidden_size * (2 * self.num_layers + 1)

    @property
    def num_params(self) -> int:
        return self.linear_params + self.embed_params + self.other_params

    def lora_params(self, r: int, target_modules: Iterable[str]) -> int:
        return self.num_layers * sum(r * sum(self.module_dims(t)) for t in target_modules)


# --------------------------------------------------------------------------------------------
# plans
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What a device runs for a round, and what it is expected to use."""

    method: str                    # lora | qlora | zo
    base: str                      # float32 | bfloat16 | nf4: how the base weights are held
    micro_batch: int
    grad_accum: int                # micro-batches per optimizer step (zo: forward chunks)
    gradient_checkpointing: bool
    batch_size: int                # the round's batch size (micro_batch × grad_accum ≥ it)
    seq_len: int
    device: str = "cpu"            # cpu | cuda
    zo_target: str | None = None   # full | lora (zo only)
    estimate_host_mb: float = 0.0
    estimate_gpu_mb: float | None = None
    breakdown: Mapping[str, float] = field(default_factory=dict, compare=False)

    @property
    def is_gradient(self) -> bool:
        return self.method != "zo"

    @property
    def build_key(self) -> tuple:
        """Plans with the same key share a loaded model (micro-batch changes need no reload)."""
        return (self.method, self.base, self.zo_target, self.gradient_checkpointing, self.device)

    def label(self) -> str:
        if self.method == "zo":
            what = "zo on all parameters" if self.zo_target == "full" else "zo on the LoRA adapter"
            head = f"{what} ({'4-bit NF4' if self.base == 'nf4' else self.base} base)"
        else:
            head = f"{self.method} ({'4-bit NF4' if self.base == 'nf4' else self.base} base)"
        mb = f"micro-batch {self.micro_batch}" + (f" × {self.grad_accum}" if self.grad_accum > 1 else "")
        ck = ", gradient checkpointing" if self.gradient_checkpointing else ""
        est = f"~{self.estimate_host_mb:.0f} MiB host" + (
            f" + {self.estimate_gpu_mb:.0f} MiB GPU" if self.estimate_gpu_mb is not None else "")
        return f"{head}, {mb}{ck}, ≤{self.seq_len} tokens: {est}"

    def to_info(self) -> dict[str, Any]:
        """The plan as announced (``fedmq_protocol.messages.MemoryPlan`` fields)."""
        return {"method": self.method, "base": self.base, "zo_target": self.zo_target,
                "micro_batch": self.micro_batch, "grad_accum": self.grad_accum,
                "gradient_checkpointing": self.gradient_checkpointing, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "device": self.device,
                "estimate_host_mb": round(self.estimate_host_mb, 1),
                "estimate_gpu_mb": None if self.estimate_gpu_mb is None else round(self.estimate_gpu_mb, 1)}

    def method_spec(self) -> tuple[str, dict[str, Any]]:
        """(registry name, constructor kwargs besides model path and adapter) of the method."""
        if self.method == "zo":
            # on the adapter: zo-adapter (edge_agent.methods.zo_adapter) sends adapter differences
            # like every other plan of an adapter federation; a zeroth-order federation's agent
            # builds ZoMethod itself
            name = "zo-adapter" if self.zo_target == "lora" else "zo"
            return name, {"dtype": "float32" if self.base == "nf4" else self.base,
                          "target": self.zo_target or "full"}
        dtype = "float32" if self.base == "nf4" else self.base
        return self.method, {"dtype": dtype, "gradient_checkpointing": self.gradient_checkpointing}

    def fits(self, budget: Budget) -> bool:
        if budget.host_mb is not None and self.estimate_host_mb > budget.host_mb:
            return False
        if budget.gpu_mb is not None and self.estimate_gpu_mb is not None and self.estimate_gpu_mb > budget.gpu_mb:
            return False
        return True


def _nf4_bytes(numel: int) -> float:
    # 4-bit codes + one uint8 absmax per block + (double quantization) one fp32 per 256 absmax
    return numel / 2 + numel / NF4_BLOCK + numel / NF4_BLOCK / 256 * 4


def estimate(
    shape: ModelShape,
    *,
    method: str,
    base: str,
    micro_batch: int,
    seq_len: int,
    gradient_checkpointing: bool = False,
    lora_r: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    device: str = "cpu",
    zo_target: str | None = None,
) -> tuple[float, float | None, dict[str, float]]:
    """(host MiB, GPU MiB or None on CPU, breakdown in MiB) of one plan's peak."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    compute_bytes = 2 if base == "bfloat16" or (device == "cuda" and base == "nf4") else 4
    full_bytes = {"float32": 4, "bfloat16": 2}.get(base, 4)
    if base == "nf4":
        weights = _nf4_bytes(shape.linear_params) + (shape.embed_params + shape.other_params) * full_bytes
    else:
        weights = shape.num_params * full_bytes
    lora = shape.lora_params(lora_r, target_modules)
    tokens = micro_batch * seq_len
    layer_elems = 9 * shape.hidden_size + 3 * shape.intermediate_size
    act_scale = ACT_BYTES * compute_bytes / 4
    attn = micro_batch * shape.num_heads * seq_len * seq_len * compute_bytes * ATTN_COPIES
    logits = tokens * shape.vocab_size * 4  # the loss is computed in float32
    b: dict[str, float] = {}
    if method == "zo":
        trainable = lora * 4 if zo_target == "lora" else 0
        b["trainable"] = trainable
        # inference: one layer's activations at a time, logits and the loss's log-softmax
        b["activations"] = tokens * layer_elems * act_scale + attn / ATTN_COPIES
        b["logits"] = logits * ZO_LOGIT_COPIES
        # z is added as it is drawn; only non-float32 parameters stage it (one buffer per worker)
        b["zo_buffers"] = 2 * ZO_CHUNK_BYTES
        # numba's runtime, only where the agent draws with the kernels (large trainable sets);
        # imported here: the direction tables cost ~0.1 s, which agents that never plan zo skip
        from edge_agent.methods.zo_directions import backend_for

        trainable_elements = lora if zo_target == "lora" else shape.num_params
        b["zo_kernels"] = ZO_KERNELS_MB * MB if backend_for(trainable_elements) == "numba" else 0.0
    else:
        b["trainable"] = lora * 16  # parameter, gradient, two AdamW moments (float32)
        if gradient_checkpointing:
            b["activations"] = (tokens * shape.num_layers * shape.hidden_size * compute_bytes
                                + tokens * layer_elems * act_scale)
            b["attention"] = attn
        else:
            b["activations"] = tokens * layer_elems * act_scale * shape.num_layers
            b["attention"] = attn * shape.num_layers
        b["logits"] = logits * LOGIT_COPIES
    transient = sum(b.values())
    b["slack"] = transient * SLACK_FRACTION + SLACK_MB * MB
    b = {k: v / MB for k, v in b.items()}
    if device == "cuda":
        host = RUNTIME_MB["cuda"]
        gpu = weights / MB + sum(b.values()) + CUDA_CONTEXT_MB
        b = {"runtime": host, "weights": weights / MB, **b}
        return host, gpu, b
    b = {"runtime": RUNTIME_MB["cpu"], "weights": weights / MB, **b}
    return sum(b.values()), None, b


def _micro_batches(batch_size: int) -> list[int]:
    """Micro-batch sizes worth trying, largest first (each with as few accumulation steps as it needs)."""
    out, mb = [], batch_size
    while mb >= 1:
        out.append(mb)
        if mb == 1:
            break
        mb = max(1, mb // 2)
    return out


def candidate_plans(
    shape: ModelShape,
    *,
    method: str,
    batch_size: int,
    seq_len: int,
    lora_r: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    device: str = "cpu",
    dtype: str = "float32",
    allow_4bit: bool = True,
    allow_zo: bool = True,
    force_checkpointing: bool = False,
    zo_target: str | None = None,
) -> list[Plan]:
    """Every plan a device configured for ``method`` may run, best first.

    ``lora``: the configured base dtype (float32, then on CUDA bfloat16), then a 4-bit base
    (``allow_4bit``); ``qlora``: the 4-bit base. For each base: micro-batches from the whole batch
    down to 1 without, then with, gradient checkpointing. Then (``allow_zo``) zeroth-order on the
    same LoRA adapter over a 4-bit base: compatible with the other devices of the federation.
    ``zo`` (a zeroth-order federation): its ``zo_target`` only, at decreasing forward chunks."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    common = dict(lora_r=lora_r, target_modules=target_modules, device=device)
    plans: list[Plan] = []

    def add(m: str, base: str, mb: int, ckpt: bool, zt: str | None = None) -> None:
        host, gpu, b = estimate(shape, method=m, base=base, micro_batch=mb, seq_len=seq_len,
                                gradient_checkpointing=ckpt, zo_target=zt, **common)
        plans.append(Plan(m, base, mb, math.ceil(batch_size / mb), ckpt, batch_size, seq_len, device, zt,
                          host, gpu, b))

    if method == "zo":
        target = zo_target or "full"
        base = "nf4" if target == "lora" else ("bfloat16" if dtype == "bfloat16" else "float32")
        for mb in _micro_batches(batch_size):
            add("zo", base, mb, False, target)
        return plans
    bases: list[tuple[str, str]] = []
    if method == "lora":
        first = "bfloat16" if dtype == "bfloat16" else "float32"
        bases.append(("lora", first))
        if first == "float32" and device == "cuda":
            # a bfloat16 base halves the weights; on CPUs bfloat16 matmuls are often an order of
            # magnitude slower than float32 (30x measured here), so CPUs go to the 4-bit base
            bases.append(("lora", "bfloat16"))
    if allow_4bit or method == "qlora":
        bases.append(("qlora", "nf4"))
    for m, base in bases:
        for ckpt in ((True,) if force_checkpointing else (False, True)):
            for mb in _micro_batches(batch_size):
                add(m, base, mb, ckpt)
    if allow_zo:
        for mb in _micro_batches(batch_size):
            add("zo", "nf4", mb, False, "lora")
    return plans


def choose_plan(shape: ModelShape, budget: Budget, **kwargs: Any) -> Plan:
    """The first (best) of ``candidate_plans(shape, **kwargs)`` that fits ``budget``.

    Raises BudgetTooSmall with one message naming the smallest budget that would work."""
    plans = candidate_plans(shape, **kwargs)
    for p in plans:
        if p.fits(budget):
            return p
    return _refuse(shape, budget, plans)


def lower_plan(current: Plan, shape: ModelShape, budget: Budget, *, measured_host_mb: float | None = None,
               measured_gpu_mb: float | None = None, **kwargs: Any) -> Plan:
    """The next plan after ``current`` once a round went over budget: estimates are scaled by how
    much the measurement exceeded ``current``'s estimate, and the result is strictly cheaper than
    ``current`` (later in the order). BudgetTooSmall when none is left."""
    factor = 1.0
    if measured_host_mb and current.estimate_host_mb > 0:
        factor = max(factor, measured_host_mb / current.estimate_host_mb)
    if measured_gpu_mb and current.estimate_gpu_mb:
        factor = max(factor, measured_gpu_mb / current.estimate_gpu_mb)
    plans = candidate_plans(shape, **kwargs)
    keys = [(p.method, p.base, p.zo_target, p.gradient_checkpointing, p.micro_batch) for p in plans]
    key = (current.method, current.base, current.zo_target, current.gradient_checkpointing, current.micro_batch)
    start = keys.index(key) + 1 if key in keys else 0
    scaled = [replace(p, estimate_host_mb=p.estimate_host_mb * factor,
                      estimate_gpu_mb=None if p.estimate_gpu_mb is None else p.estimate_gpu_mb * factor)
              for p in plans]
    for p in scaled[start:]:
        if p.fits(budget) and p.estimate_host_mb < current.estimate_host_mb * factor:
            return p
    return _refuse(shape, budget, scaled[start:] or scaled)


def _refuse(shape: ModelShape, budget: Budget, plans: Sequence[Plan]) -> Plan:
    if not plans:
        raise BudgetTooSmall(f"no training plan for {shape.name}", min_host_mb=None)
    cheapest = min(plans, key=lambda p: (p.estimate_gpu_mb or 0.0, p.estimate_host_mb))
    need_host = math.ceil(cheapest.estimate_host_mb)
    need_gpu = None if cheapest.estimate_gpu_mb is None else math.ceil(cheapest.estimate_gpu_mb)
    need = f"{need_host} MiB host" + (f" and {need_gpu} MiB GPU" if need_gpu is not None else "")
    msg = (f"memory budget {budget.describe()} is too small to train {shape.name}: the smallest plan "
           f"({cheapest.label()}) needs {need}; set memory_budget to at least "
           f"host_mb: {need_host}" + (f", gpu_mb: {need_gpu}" if need_gpu is not None else ""))
    raise BudgetTooSmall(msg, min_host_mb=need_host, min_gpu_mb=need_gpu, smallest=cheapest)
