"""``CausalLmMethod``: the trainer interface for a causal LM held in memory, with a set of
trainable parameters; LoRA attachment, tokenization, the step loop and evaluation shared by every
method.

Randomness never touches the global RNGs permanently: LoRA init draws ``lora_A`` from a CPU
``torch.Generator`` seeded with ``seed`` (identical on CPU and CUDA devices), batches are drawn
with ``random.Random(cfg.seed)`` (``BatchSampler``), and dropout inside a gradient ``fit`` runs
under ``torch.random.fork_rng`` seeded with ``cfg.seed`` so a fit is reproducible and the
caller's RNG state is restored.
"""

from __future__ import annotations

import abc
import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from edge_agent.data import PROMPT_TEMPLATE, Example, chat_messages, check_template, format_prompt
from edge_agent.methods.base import (
    FULL_PRECISION,
    NO_PLAN,
    BatchSampler,
    FitMemory,
    FitResult,
    ModelLoader,
    ProgressFn,
    Row,
    StopFn,
    TrainingMethod,
)
from edge_agent.models import lora_target_modules, resolve_device
from fedmq_protocol.messages import AdapterSpec, FitConfig

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig

ADAPTER_NAME = "default"
_TOKEN_CACHE_MAX = 200_000


class CausalLmMethod(TrainingMethod):
    """A causal LM in memory with a set of trainable parameters (``self._params``, by name).

    Subclasses build the model from the loaded base (``_build``: attach an adapter, pick the
    parameters) and implement ``fit`` with ``_train_steps``. Constructor keywords: ``device``,
    ``dtype``, ``seed`` (LoRA init), ``loader`` (default: the class's ``default_loader``),
    ``template`` (``data.template``: auto, chat, plain or a format string with ``{prompt}``;
    ``self.template`` is what it resolved to: chat, plain or custom)."""

    default_loader: ClassVar[ModelLoader] = FULL_PRECISION

    def __init__(
        self,
        model_path: str,
        adapter: AdapterSpec,
        *,
        device: str = "auto",
        dtype: str = "float32",
        seed: int = 0,
        loader: ModelLoader | None = None,
        template: str = "auto",
    ) -> None:
        super().__init__(model_path, adapter)
        self.seed = seed
        self.device = resolve_device(device)
        self.dtype = dtype
        self.loader = loader if loader is not None else self.default_loader
        base, self.tokenizer = self.loader.load(model_path, dtype=dtype, device=self.device)
        self.model, self._params = self._build(base)
        self._token_cache: dict[tuple[str, str, tuple[tuple[str, str], ...]], Row] = {}
        self._eos = self.tokenizer.eos_token_id
        self._pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self._eos
        self.template, self._format = resolve_template(template, self.tokenizer)

    @classmethod
    def options_for(cls, config: AgentConfig) -> dict[str, Any]:
        """The prompt template (``data.template``)."""
        return {"template": config.data.template}

    @abc.abstractmethod
    def _build(self, base: Any) -> tuple[Any, dict[str, torch.nn.Parameter]]:
        """(the model trained, its trainable parameters by name) from the loaded base."""

    # -- RNG ----------------------------------------------------------------------------------
    def _rng_devices(self) -> list[int]:
        if self.device.startswith("cuda"):
            return [torch.device(self.device).index or torch.cuda.current_device()]
        return []

    @contextlib.contextmanager
    def _rng_guard(self, seed: int) -> Iterator[None]:
        with torch.random.fork_rng(devices=self._rng_devices()):
            torch.manual_seed(seed % (2**63))
            yield

    # -- LoRA ---------------------------------------------------------------------------------
    def _attach_lora(self, base: Any) -> tuple[Any, dict[str, torch.nn.Parameter]]:
        """A peft LoRA adapter (``self.adapter_spec``) on ``base``; its parameters by name (without
        peft's adapter name), initialised from ``self.seed``."""
        from peft import LoraConfig, get_peft_model

        adapter = self.adapter_spec
        lcfg = LoraConfig(
            r=adapter.r,
            lora_alpha=adapter.alpha,  # type: ignore[arg-type]  # peft annotates int; a float scale works
            lora_dropout=adapter.dropout,
            # Llama's module names, or the architecture's fused ones; ("all-linear",): peft's all-linear
            target_modules=lora_target_modules(str(getattr(base.config, "model_type", "") or ""),
                                               adapter.target_modules),
            bias="none",
            task_type="CAUSAL_LM",
        )
        with self._rng_guard(self.seed), warnings.catch_warnings():
            # peft calls a transformers API deprecated in v5 (is_gradient_checkpointing)
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            try:
                model = get_peft_model(base, lcfg, adapter_name=ADAPTER_NAME)
            except ValueError as exc:  # e.g. target modules not found
                raise ValueError(f"cannot attach LoRA {adapter.model_dump()} to {self.model_path}: {exc}") from exc
        model.eval()
        params: dict[str, torch.nn.Parameter] = {}
        for pname, p in model.named_parameters():
            if p.requires_grad:
                params[pname.replace(f".{ADAPTER_NAME}.", ".")] = p
        if not params:
            raise ValueError(f"LoRA {adapter.model_dump()} on {self.model_path} has no trainable parameters")
        _init_lora(params, self.seed)
        if adapter.freeze_a:
            for pname, p in params.items():
                if ".lora_A." in pname:
                    p.requires_grad_(False)  # still part of the adapter: it travels in the global
        return model, params

    # -- state --------------------------------------------------------------------------------
    def adapter_names(self) -> list[str]:
        return list(self._params)

    def num_trainable_params(self) -> int:
        return sum(p.numel() for p in self._params.values())

    def get_state(self) -> dict[str, np.ndarray]:
        return {n: p.detach().to("cpu", torch.float32).numpy().copy() for n, p in self._params.items()}

    def set_state(self, tensors: Mapping[str, Any]) -> None:
        unknown = sorted(set(tensors) - set(self._params))
        if unknown:
            raise ValueError(f"unknown adapter tensor {unknown[0]!r} ({len(unknown)} unknown)")
        missing = [n for n in self._params if n not in tensors]
        if missing:
            raise ValueError(f"missing adapter tensor {missing[0]!r} ({len(missing)} missing)")
        staged: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        for n, p in self._params.items():
            try:
                arr = np.asarray(tensors[n], dtype=np.float32)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"adapter tensor {n!r} is not numeric: {exc}") from None
            if tuple(arr.shape) != tuple(p.shape):
                raise ValueError(f"adapter tensor {n!r} has shape {tuple(arr.shape)}, expected {tuple(p.shape)}")
            if not np.isfinite(arr).all():
                raise ValueError(f"adapter tensor {n!r} has non-finite values")
            staged.append((p, torch.from_numpy(np.ascontiguousarray(arr))))
        with torch.no_grad():
            for p, t in staged:
                p.copy_(t.to(p.device, p.dtype))

    # -- tokenization -------------------------------------------------------------------------
    def _token_ids(self, ex: Example) -> Row:
        """(prompt ids, response ids): the loss is on the response ids only."""
        key = (ex.prompt, ex.response, ex.turns)
        hit = self._token_cache.get(key)
        if hit is None:
            if self.template == "chat":
                p, r = chat_token_ids(self.tokenizer, ex, self.model_path)
            else:
                p = self.tokenizer(format_prompt(ex.prompt, self._format))["input_ids"]
                r = self.tokenizer(ex.response, add_special_tokens=False)["input_ids"] + [self._eos]
            if len(self._token_cache) >= _TOKEN_CACHE_MAX:
                self._token_cache.clear()
            hit = self._token_cache[key] = (list(p), list(r))
        return hit

    def _encode(self, ex: Example, max_len: int) -> Row:
        """(input_ids, labels); prompt labels -100. Too long: the prompt loses its beginning
        (keeping at least half the window) and the response its end."""
        p, r = self._token_ids(ex)
        if len(p) + len(r) > max_len:
            keep_p = min(len(p), max(max_len - len(r), max_len // 2))
            p = p[len(p) - keep_p:]
            r = r[: max_len - keep_p]
        return p + r, [-100] * len(p) + r

    def _collate(self, encoded: Sequence[Row]) -> dict[str, torch.Tensor]:
        width = max(len(ids) for ids, _ in encoded)
        n = len(encoded)
        input_ids = torch.full((n, width), self._pad, dtype=torch.long)
        labels = torch.full((n, width), -100, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        for i, (ids, lab) in enumerate(encoded):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            attn[i, : len(ids)] = 1
        dev = self._input_device()
        return {"input_ids": input_ids.to(dev), "attention_mask": attn.to(dev), "labels": labels.to(dev)}

    def _input_device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    # -- the step loop ------------------------------------------------------------------------
    def _train_steps(
        self,
        encoded: Sequence[Row],
        cfg: FitConfig,
        step: Callable[[int, list[Row]], tuple[float, int]],
        *,
        progress: ProgressFn | None,
        should_stop: StopFn | None,
    ) -> tuple[list[float], int]:
        """``cfg.local_steps`` calls of ``step(index, rows)`` -> (loss, tokens) on the batches of
        one ``BatchSampler``; stops early when ``should_stop()``; ``progress`` after each step.
        Returns (the losses, the tokens)."""
        sampler = BatchSampler(len(encoded), cfg.batch_size, cfg.seed)
        losses: list[float] = []
        tokens = 0
        for i in range(cfg.local_steps):
            if should_stop is not None and should_stop():
                break
            loss, n_tok = step(i, [encoded[j] for j in sampler.next()])
            losses.append(loss)
            tokens += n_tok
            if progress is not None:
                progress(i + 1, loss)
        return losses, tokens

    @staticmethod
    def _result(examples: Sequence[Example], losses: list[float], tokens: int, started: float) -> FitResult:
        return FitResult(
            num_samples=len(examples),
            steps=len(losses),
            train_loss=float(np.mean(losses)) if losses else float("nan"),
            seconds=time.perf_counter() - started,
            tokens=tokens,
        )

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example], cfg: FitConfig, *,
                 memory: FitMemory | None = None) -> tuple[float, int]:
        """Token-weighted mean loss over response tokens, in order, batches of cfg.batch_size
        (only the first ``cfg.eval_batches`` when > 0). Returns (loss, examples evaluated)."""
        if not examples:
            raise ValueError("evaluate needs at least one example")
        bs = cfg.batch_size
        n = len(examples)
        if cfg.eval_batches > 0:
            n = min(n, cfg.eval_batches * bs)
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        chunk = min(bs, (memory or NO_PLAN).micro_batch or bs)  # the memory plan's micro-batch bounds the logits
        try:
            for start in range(0, n, chunk):
                rows = examples[start:min(start + chunk, n)]
                batch = self._collate([self._encode(ex, cfg.max_seq_len) for ex in rows])
                labels = batch.pop("labels")
                logits = self.model(**batch).logits[:, :-1].float()
                target = labels[:, 1:]
                total += float(torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum"))
                count += int((target != -100).sum())
        finally:
            if was_training:
                self.model.train()
        return (total / count if count else float("nan")), n

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(model={self.model_path!r}, r={self.adapter_spec.r}, "
                f"device={self.device!r}, trainable={self.num_trainable_params()})")


def chat_token_ids(tok: Any, ex: Example, model: str = "the model") -> Row:
    """The chat template's (prompt ids, response ids): the prompt is the conversation templated
    with ``add_generation_prompt=True``, the response what the full conversation adds to it: the
    answer and the end-of-turn token(s), whitespace after the last of them dropped."""
    before = chat_messages(ex)
    prompt_text = tok.apply_chat_template(before, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template([*before, {"role": "assistant", "content": ex.response}], tokenize=False)
    p = list(tok(prompt_text, add_special_tokens=False)["input_ids"])
    full = list(tok(full_text, add_special_tokens=False)["input_ids"])
    if full[:len(p)] != p or len(full) <= len(p):
        raise ValueError(
            f"the chat template of {model} does not extend the prompt (templated with "
            "add_generation_prompt) into the conversation with the answer, so the answer tokens "
            "cannot be told apart; set data.template: plain or a format string")
    r = full[len(p):]
    special = set(tok.all_special_ids)
    while len(r) > 1 and r[-1] not in special and not tok.decode([r[-1]]).strip():
        r.pop()  # the newline after the end-of-turn token is no part of the answer
    return p, r


def resolve_template(template: str, tokenizer: Any) -> tuple[str, str]:
    """(chat | plain | custom, the format string of plain and custom) for ``data.template`` and this
    tokenizer: ``auto`` is chat when the tokenizer has a chat template, else plain."""
    check_template(template)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    if template == "auto":
        template = "chat" if has_chat else "plain"
    if template == "chat":
        if not has_chat:
            raise ValueError("data.template is chat but the tokenizer has no chat template; "
                             "use auto, plain or a format string")
        return "chat", PROMPT_TEMPLATE
    if template == "plain":
        return "plain", PROMPT_TEMPLATE
    return "custom", template


def _init_lora(params: Mapping[str, torch.nn.Parameter], seed: int) -> None:
    """kaiming-uniform(a=sqrt(5)) lora_A (peft's default: U(-1/sqrt(fan_in), +)), zero lora_B,
    drawn in float32 on a private CPU generator: same init on every device."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed % (2**63))
    with torch.no_grad():
        for pname, p in params.items():
            if ".lora_A." in pname:
                fan_in = p.shape[1]
                bound = 1.0 / math.sqrt(fan_in)
                w = torch.rand(p.shape, generator=gen, dtype=torch.float32) * (2 * bound) - bound
                p.copy_(w.to(p.device, p.dtype))
            elif ".lora_B." in pname:
                p.zero_()
