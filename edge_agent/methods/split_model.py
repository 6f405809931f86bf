"""A causal LM cut into parts for split learning (U-shape), each part with its own LoRA.

The decoder blocks ``0..n-1`` of a llama-family model (Llama, SmolLM2, Qwen2 without sliding
windows, Mistral without sliding windows) are split in three ranges:

- the device's *head*: the token embedding and blocks ``0..l_head-1``;
- the server's *middle*: blocks ``l_head..n-l_tail-1``;
- the device's *tail*: blocks ``n-l_tail..n-1``, the final norm and the LM head (so labels and
  logits never leave the device: U-shape).

A part keeps only the blocks of its ranges (the others are dropped right after loading, with their
weights), and LoRA is attached before dropping, so a part's adapter tensors have the same names
and the same seeded initial values as the unsplit model's LoRA on those blocks
(``base_model.model.model.layers.{i}...``). What crosses a cut is the hidden state ``[B, T, H]``
and the 2-D attention mask ``[B, T]``; position ids are ``0..T-1`` on every side (right padding)
and each side builds the causal mask and rotary embeddings from them, exactly as the unsplit
model does, so chaining the parts reproduces the unsplit model's logits, loss and gradients.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from edge_agent.models import lora_target_modules
from fedmq_protocol.messages import AdapterSpec

ADAPTER_NAME = "default"
#: model types whose decoder the parts drive (the same block interface and masks as Llama)
SPLITTABLE = ("llama", "qwen2", "mistral")


@dataclass(frozen=True)
class Cut:
    """Where a model of ``n_layers`` blocks is cut: the device keeps ``l_head`` blocks at the
    start and ``l_tail`` at the end; the server runs the rest (at least one block)."""

    n_layers: int
    l_head: int
    l_tail: int

    def __post_init__(self) -> None:
        if self.l_head < 1 or self.l_tail < 0:
            raise ValueError(f"split: l_head must be >= 1 and l_tail >= 0, got {self.l_head} and {self.l_tail}")
        if self.l_head + self.l_tail >= self.n_layers:
            raise ValueError(f"split: l_head {self.l_head} + l_tail {self.l_tail} leave no block of the "
                             f"model's {self.n_layers} for the split server")

    @property
    def device_layers(self) -> list[int]:
        return [*range(self.l_head), *range(self.n_layers - self.l_tail, self.n_layers)]

    @property
    def server_layers(self) -> list[int]:
        return list(range(self.l_head, self.n_layers - self.l_tail))


def decoder_of(model: Any) -> tuple[Any, Any]:
    """(the decoder: embed_tokens, layers, norm, rotary_emb; the LM head) of a causal LM, peft-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model, base.lm_head


def check_splittable(model: Any, where: str = "model") -> int:
    """The number of decoder blocks of ``model``; ValueError when it is not a family the parts drive."""
    cfg = model.config
    mtype = str(getattr(cfg, "model_type", ""))
    if mtype not in SPLITTABLE:
        raise ValueError(f"{where}: split learning supports {', '.join(SPLITTABLE)} models, not {mtype!r}")
    if getattr(cfg, "use_sliding_window", False) and getattr(cfg, "sliding_window", None):
        raise ValueError(f"{where}: split learning does not support sliding-window attention")
    return int(cfg.num_hidden_layers)


def attach_lora(base: Any, adapter: AdapterSpec, seed: int, where: str) -> tuple[Any, dict[str, torch.nn.Parameter]]:
    """peft LoRA on every block of ``base``, initialised as the LoRA trainer does (lora_A from a
    CPU generator seeded with ``seed``, lora_B zero); the parameters by name without the adapter name."""
    from peft import LoraConfig, get_peft_model

    from edge_agent.methods.causal_lm import _init_lora

    lcfg = LoraConfig(
        r=adapter.r, lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft annotates int; a float works
        lora_dropout=adapter.dropout,
        target_modules=lora_target_modules(str(getattr(base.config, "model_type", "") or ""), adapter.target_modules),
        bias="none", task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            model = get_peft_model(base, lcfg, adapter_name=ADAPTER_NAME)
        except ValueError as exc:
            raise ValueError(f"cannot attach LoRA {adapter.model_dump()} to {where}: {exc}") from exc
    model.eval()
    params = {n.replace(f".{ADAPTER_NAME}.", "."): p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise ValueError(f"LoRA {adapter.model_dump()} on {where} has no trainable parameters")
    _init_lora(params, seed)
    if adapter.freeze_a:
        for n, p in params.items():
            if ".lora_A." in n:
                p.requires_grad_(False)
    return model, params


def layer_index(name: str) -> int | None:
    """The block index in a parameter name (``...layers.{i}....``), None outside the blocks."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def keep_blocks(model: Any, params: dict[str, torch.nn.Parameter], keep: Sequence[int], *,
                embedding: bool, head: bool) -> dict[str, torch.nn.Parameter]:
    """Drop every block not in ``keep`` (and the embedding / final norm and LM head unless asked
    to keep them) from ``model``; the trainable parameters of what is left, by their unsplit names."""
    decoder, _ = decoder_of(model)
    blocks = list(decoder.layers)
    decoder.layers = torch.nn.ModuleList([blocks[i] for i in keep])
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not embedding and not head:
        # the server: no embedding (input is hidden states) and no head (tied or not)
        decoder.embed_tokens = None
        decoder.norm = torch.nn.Identity()
        base.lm_head = torch.nn.Identity()
    kept = set(keep)
    return {n: p for n, p in params.items() if (layer_index(n) in kept) or layer_index(n) is None}


def _causal_mask(decoder: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> Any:
    from transformers.masking_utils import create_causal_mask

    kwargs: dict[str, Any] = {"config": decoder.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
                              "position_ids": positions}
    # the cache argument is ``cache`` (transformers >= 5.2) or ``past_key_values`` before
    key = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    kwargs[key] = None
    return create_causal_mask(**kwargs)


def run_blocks(decoder: Any, blocks: Sequence[Any], hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``hidden`` through ``blocks`` with the causal mask and rotary embeddings of positions 0..T-1."""
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
    mask = _causal_mask(decoder, hidden, attention_mask, positions)
    rope = decoder.rotary_emb(hidden, position_ids=positions)
    for block in blocks:
        hidden = block(hidden, attention_mask=mask, position_embeddings=rope, position_ids=positions, use_cache=False)
    return hidden


class DeviceParts:
    """The device's share of a U-shape split: the embedding and head blocks, the tail blocks, the
    final norm and the LM head (``model`` holds only those, with LoRA)."""

    def __init__(self, model: Any, cut: Cut) -> None:
        self.model, self.cut = model, cut
        self.decoder, self.lm_head = decoder_of(model)

    @property
    def head_blocks(self) -> list[Any]:
        return list(self.decoder.layers)[: self.cut.l_head]

    @property
    def tail_blocks(self) -> list[Any]:
        return list(self.decoder.layers)[self.cut.l_head:]

    def head(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.decoder.embed_tokens(input_ids)
        return run_blocks(self.decoder, self.head_blocks, hidden, attention_mask)

    def tail(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The logits from the hidden state at the tail cut."""
        hidden = run_blocks(self.decoder, self.tail_blocks, hidden, attention_mask)
        return self.lm_head(self.decoder.norm(hidden))  # type: ignore[no-any-return]

    def tail_loss(self, hidden: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                  reduction: str = "mean") -> torch.Tensor:
        """``response_loss(self.tail(hidden, mask), labels)``, with the LM head applied only at the
        positions that predict a label (the response tokens): the same loss and gradients without
        the ``[B, T, vocab]`` logits of prompt and padding positions."""
        hidden = self.decoder.norm(run_blocks(self.decoder, self.tail_blocks, hidden, attention_mask))
        target = labels[:, 1:]
        keep = target != -100
        logits = self.lm_head(hidden[:, :-1][keep]).float()
        return torch.nn.functional.cross_entropy(logits, target[keep], reduction=reduction)


class ServerPart:
    """The server's share: the middle blocks (``model`` holds only those, with LoRA)."""

    def __init__(self, model: Any, cut: Cut) -> None:
        self.model, self.cut = model, cut
        self.decoder, _ = decoder_of(model)

    @property
    def hidden_size(self) -> int:
        return int(self.decoder.config.hidden_size)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.decoder, list(self.decoder.layers), hidden, attention_mask)


def response_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The causal LM loss (next-token cross entropy over positions whose label is not -100), as
    transformers computes it for ``model(..., labels=...)``."""
    shift = logits[:, :-1].float()
    target = labels[:, 1:]
    return torch.nn.functional.cross_entropy(shift.reshape(-1, shift.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction=reduction)


def load_part(model_path: str, adapter: AdapterSpec, *, l_head: int, l_tail: int, side: str, seed: int = 0,
              dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any, dict[str, torch.nn.Parameter], Cut]:
    """(tokenizer, DeviceParts or ServerPart, its LoRA parameters by name, the cut) of ``model_path``
    for ``side`` ("device" or "server")."""
    from edge_agent.methods.base import release_memory
    from edge_agent.models import load_causal_lm

    base, tok = load_causal_lm(model_path, quantize_4bit=False, dtype=dtype, device=device)
    cut = Cut(check_splittable(base, model_path), l_head, l_tail)
    model, params = attach_lora(base, adapter, seed, model_path)
    if side == "device":
        params = keep_blocks(model, params, cut.device_layers, embedding=True, head=True)
        part: Any = DeviceParts(model, cut)
    elif side == "server":
        params = keep_blocks(model, params, cut.server_layers, embedding=False, head=False)
        part = ServerPart(model, cut)
    else:
        raise ValueError(f"side must be device or server, not {side!r}")
    release_memory()  # the dropped blocks' weights go back to the OS
    return tok, part, params, cut


def param_numel(params: dict[str, torch.nn.Parameter]) -> int:
    return sum(math.prod(p.shape) for p in params.values())


__all__ = ["SPLITTABLE", "Cut", "DeviceParts", "ServerPart", "attach_lora", "check_splittable", "decoder_of",
           "keep_blocks", "layer_index", "load_part", "response_loss", "run_blocks"]
