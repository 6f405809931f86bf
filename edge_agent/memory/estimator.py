"""The peak-memory estimate of a training plan, from the model's config (no trial run).

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

``estimate_split``: the device's part of a split plan (U-shape, ``edge_agent.methods.split``): the
same arithmetic over the embedding, the ``l_head + l_tail`` blocks it holds, the final norm and
the LM head (LoRA on those blocks), one whole batch per step, plus ``CUT_BUFFERS`` float32 hidden
states ``[B, T, H]`` alive at the cuts (sent, received, their gradients and the codec's copies).

The constants were calibrated against peaks measured on SmolLM2-135M-Instruct (CPU, torch 2.13,
glibc with a fixed mmap threshold, see ``edge_agent.memory.guard.configure_allocator``); the
figures are in docs/benchmarks.md (``bench/memory.py``). GPU estimates use the same arithmetic
in the compute dtype and a CUDA context allowance; they were not calibrated here (no GPU).

This module imports neither torch nor transformers: the coordinator, tests and the CLI may use it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_agent.memory.budget import MB

Method = Literal["lora", "qlora", "zo", "krso", "split"]
Base = Literal["float32", "bfloat16", "nf4"]  # how the base weights are held
ZoTarget = Literal["full", "lora"]  # what zeroth-order training perturbs
DeviceKind = Literal["cpu", "cuda"]

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
KRSO_SEEDS = 4           # accumulators a krso plan budgets for (FedKRSO's default K)
CUT_BUFFERS = 6          # split: float32 [B, T, H] buffers at the cuts (up, down, their gradients, codec copies)

METHODS: tuple[Method, ...] = ("lora", "qlora", "zo", "krso")
# what a gradient-trained adapter federation accepts: every plan that trains the same LoRA adapter
ADAPTER_METHODS: tuple[Method, ...] = ("lora", "qlora", "zo", "krso")

_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


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
    model_type: str = ""  # config.json's model_type (phi3 fuses q/k/v and gate/up)
    bias_params: int = 0  # biases of the decoder layers' linears (Qwen2: q/k/v)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], name: str = "model") -> ModelShape:
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
        model_type = str(cfg.get("model_type") or "")
        qkv = (heads + 2 * kv) * head_dim
        if model_type == "qwen2":  # q/k/v always carry a bias
            bias = qkv
        elif cfg.get("attention_bias"):  # Llama-style: q/k/v and o
            bias = qkv + int(h)
        else:
            bias = 0
        return cls(int(vocab), int(h), inter, int(layers), heads, kv, head_dim,
                   bool(cfg.get("tie_word_embeddings", True)), name, model_type, bias * int(layers))

    @classmethod
    def from_path(cls, path: str | Path) -> ModelShape:
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
        """(in, out) features of a decoder-layer linear (Llama naming, and Phi-3's fused qkv_proj and
        gate_up_proj; others count as h × h)."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
                "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i)}.get(name, (h, h))

    @property
    def linear_params(self) -> int:
        """Weights of the decoder layers' linears (what NF4 quantizes)."""
        per_layer = sum(a * b for a, b in (self.module_dims(n) for n in _LINEARS))
        return per_layer * self.num_layers

    @property
    def embed_params(self) -> int:
        """Input embeddings plus an untied output head (not quantized)."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    @property
    def other_params(self) -> int:
        """Norms: two per layer plus the final one; the linears' biases."""
        return self.hidden_size * (2 * self.num_layers + 1) + self.bias_params

    @property
    def num_params(self) -> int:
        return self.linear_params + self.embed_params + self.other_params

    def lora_params(self, r: int, target_modules: Iterable[str]) -> int:
        """LoRA parameters on ``target_modules`` (Llama names, as the adapter spec gives them: the
        modules the architecture fuses them into are counted once; ``all-linear``: every linear)."""
        from edge_agent.models import ALL_LINEAR, lora_target_modules

        modules = lora_target_modules(self.model_type, tuple(target_modules))
        if modules == ALL_LINEAR:
            modules = lora_target_modules(self.model_type, _LINEARS)
        return self.num_layers * sum(r * sum(self.module_dims(t)) for t in modules)

    def target_dims(self, target_modules: Iterable[str]) -> tuple[int, int, int, int]:
        """(sum of d_in, sum of d_out, largest d_in x d_out, sum of d_in x d_out) over the targeted
        decoder-layer linears."""
        from edge_agent.models import ALL_LINEAR, lora_target_modules

        modules = lora_target_modules(self.model_type, tuple(target_modules))
        if modules == ALL_LINEAR:
            modules = lora_target_modules(self.model_type, _LINEARS)
        dims = [self.module_dims(t) for t in modules]
        return (self.num_layers * sum(d for d, _ in dims), self.num_layers * sum(o for _, o in dims),
                max((d * o for d, o in dims), default=0), self.num_layers * sum(d * o for d, o in dims))


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
    krso_seeds: int = KRSO_SEEDS,
) -> tuple[float, float | None, dict[str, float]]:
    """(host MiB, GPU MiB or None on CPU, breakdown in MiB) of one plan's peak. ``krso_seeds``:
    the accumulators a krso fit holds (one per seed used: at most K and the round's intervals)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if method == "krso" and base == "nf4":
        raise ValueError("krso updates the base weights in place: its base is float32 or bfloat16, never nf4")
    compute_bytes = 2 if base == "bfloat16" or (device == "cuda" and base == "nf4") else 4
    full_bytes = {"float32": 4, "bfloat16": 2}.get(base, 4)
    weights: float
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
        if method == "krso":
            # B (d_out x r): parameter, gradient, two Adam moments; P_s (r x d_in) per targeted
            # linear; one accumulator per seed used; a bfloat16 base merges through a float32 B P_s
            d_in, d_out, largest, targeted = shape.target_dims(target_modules)
            b["trainable"] = lora_r * d_out * 16
            b["projections"] = lora_r * d_in * 4
            b["accumulators"] = krso_seeds * lora_r * d_out * 4
            b["merge"] = largest * 4 if base == "bfloat16" else 0.0  # float32 merges in place (addmm_)
            from edge_agent.methods.zo_directions import backend_for

            # rounds are applied by compiled kernels where the targeted weights are many (numba's runtime)
            b["krso_kernels"] = ZO_KERNELS_MB * MB if backend_for(targeted) == "numba" else 0.0
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


def estimate_split(
    shape: ModelShape,
    *,
    l_head: int,
    l_tail: int,
    micro_batch: int,
    seq_len: int,
    base: str = "float32",
    lora_r: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    device: str = "cpu",
) -> tuple[float, float | None, dict[str, float]]:
    """(host MiB, GPU MiB or None on CPU, breakdown in MiB) of the device's peak in a split plan:
    the embedding, blocks ``0..l_head-1`` and ``n-l_tail..n-1`` with LoRA, the final norm and the
    LM head; the activations and attention of those blocks for ``micro_batch`` sequences of
    ``seq_len`` tokens, the logits, and the hidden states crossing the cuts."""
    n = shape.num_layers
    if l_head < 1 or l_tail < 0 or l_head + l_tail >= n:
        raise ValueError(f"split cut l_head={l_head} l_tail={l_tail} is not a cut of {shape.name}'s {n} blocks "
                         "(l_head >= 1, l_tail >= 0, at least one block left for the split server)")
    if base not in ("float32", "bfloat16"):
        raise ValueError(f"a split device holds a float32 or bfloat16 base, not {base!r}")
    k = l_head + l_tail
    compute_bytes = 2 if base == "bfloat16" else 4
    per_block = shape.linear_params // n + shape.bias_params // n + 2 * shape.hidden_size
    weights = (shape.embed_params + k * per_block + shape.hidden_size) * compute_bytes
    tokens = micro_batch * seq_len
    layer_elems = 9 * shape.hidden_size + 3 * shape.intermediate_size
    attn = micro_batch * shape.num_heads * seq_len * seq_len * compute_bytes * ATTN_COPIES
    b: dict[str, float] = {
        "trainable": shape.lora_params(lora_r, target_modules) * k // n * 16,
        "activations": tokens * layer_elems * ACT_BYTES * compute_bytes / 4 * k,
        "attention": attn * k,
        "logits": tokens * shape.vocab_size * 4 * LOGIT_COPIES,
        "cut_buffers": tokens * shape.hidden_size * 4 * CUT_BUFFERS,
    }
    b["slack"] = sum(b.values()) * SLACK_FRACTION + SLACK_MB * MB
    b = {key: v / MB for key, v in b.items()}
    if device == "cuda":
        host = RUNTIME_MB["cuda"]
        gpu = weights / MB + sum(b.values()) + CUDA_CONTEXT_MB
        return host, gpu, {"runtime": host, "weights": weights / MB, **b}
    b = {"runtime": RUNTIME_MB["cpu"], "weights": weights / MB, **b}
    return sum(b.values()), None, b
