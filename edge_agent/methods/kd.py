"""LoRA with a distillation term on the public probe set (KD-FedLLM), and the probe pass.

``fit`` trains the device's own adapter on its private data; given a consensus, each step adds
``lam * T^2 * KL(consensus || softmax(z / T))`` over the consensus support at the probe positions
of ``probe_batch_size`` probes (drawn by ``random.Random(cfg.seed + 1)``). With ``select="better"``
a drawn probe counts only where the consensus gives its public response a higher mean
log-likelihood than the device's model does at that step (FedMKT's min-cross-entropy choice
between a device's own distribution and the other's): a device is not pulled from what it
already knows better towards a consensus diluted by weaker models. ``probe_topk`` runs the
probe set and returns, per position, the top-k next-token ids and log-probs (temperature 1), one
confidence per probe (exp of the mean log-likelihood of its response tokens) and, given a
consensus, the mean KL to it.

Positions: a probe's context is the prompt in the device's own template; its positions are the
tokens of the public response (``tokenizer(response, add_special_tokens=False)``, at most
``max_response_tokens``), each predicted from everything before it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from edge_agent.data import Example
from edge_agent.methods.base import FitMemory, FitResult, ProgressFn, Row, StopFn
from edge_agent.methods.lora import LoraMethod
from edge_agent.models import tokenizer_fingerprint
from fedmq_protocol.messages import FitConfig
from fedmq_protocol.modes.kd import Probe, Selection


@dataclass(frozen=True)
class Distill:
    """The distillation target of one fit: the probes, the consensus per position, the settings."""

    probes: Sequence[Probe]
    ids: np.ndarray  # int64 [P, K]
    probs: np.ndarray  # float [P, K]
    lam: float
    temperature: float
    max_response_tokens: int
    probe_batch_size: int
    select: Selection = "all"  # "all" probes, or those where the consensus explains the response "better"


# probability given to a response token outside the consensus support when scoring the consensus
OUTSIDE_SUPPORT = 1e-6


@dataclass(frozen=True)
class ProbeAnswer:
    positions: list[int]
    ids: np.ndarray  # int64 [P, k]
    logprobs: np.ndarray  # float32 [P, k]
    confidence: np.ndarray  # float32 [probes]
    kl: float | None  # mean KL(consensus || model) over positions, when a consensus was given


class KdMethod(LoraMethod):
    """LoRA (gradients, AdamW) plus distillation towards a consensus on the probe set."""

    name: ClassVar[str] = "kd"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tokenizer_fingerprint = tokenizer_fingerprint(self.tokenizer)
        self.vocab_size = int(self.model.get_output_embeddings().weight.shape[0])
        self._distill: Distill | None = None
        self._probe_rows: list[tuple[Row, int]] = []
        self._offsets: np.ndarray = np.zeros(1, dtype=np.int64)
        self._consensus_ll: np.ndarray = np.zeros(0)  # per probe: mean log-likelihood of its response
        self.kd_probes_drawn = 0  # in the last fit: probes drawn for the distillation term
        self.kd_probes_used = 0  # of those, the ones it distilled on (all of them unless select="better")
        self._probe_rng = random.Random(0)
        self.last_kd_loss: float | None = None

    # -- probes -------------------------------------------------------------------------------
    def probe_rows(self, probes: Sequence[Probe], max_response_tokens: int, max_len: int) -> list[tuple[Row, int]]:
        """((input ids, labels), number of positions) per probe; labels mark the response tokens."""
        out = []
        for pr in probes:
            prompt_ids, _ = self._token_ids(Example(pr.prompt, pr.response))
            resp = list(self.tokenizer(pr.response, add_special_tokens=False)["input_ids"])[:max_response_tokens]
            if not resp:
                raise ValueError(f"probe response {pr.response[:40]!r} has no tokens")
            keep = max(1, max_len - len(resp))
            p = list(prompt_ids)[-keep:]
            out.append(((p + resp, [-100] * len(p) + resp), len(resp)))
        return out

    def _probe_logits(self, rows: Sequence[tuple[Row, int]]) -> torch.Tensor:
        """The logits at the positions of ``rows`` (concatenated in order): [sum positions, vocab]."""
        batch = self._collate([r for r, _ in rows])
        labels = batch.pop("labels")
        logits = self.model(**batch).logits[:, :-1]
        mask = labels[:, 1:] != -100
        return logits[mask].float()

    @torch.no_grad()
    def probe_topk(self, probes: Sequence[Probe], *, top_k: int, max_response_tokens: int, max_len: int,
                   batch_size: int = 8, consensus: tuple[np.ndarray, np.ndarray] | None = None) -> ProbeAnswer:
        rows = self.probe_rows(probes, max_response_tokens, max_len)
        was_training = self.model.training
        self.model.eval()
        ids_out, lp_out, conf, kls = [], [], [], []
        offset = 0
        try:
            for start in range(0, len(rows), batch_size):
                part = rows[start:start + batch_size]
                logp = torch.log_softmax(self._probe_logits(part), dim=-1)
                vals, idx = torch.topk(logp, top_k, dim=-1)
                ids_out.append(idx.cpu().numpy())
                lp_out.append(vals.cpu().numpy())
                conf += [float(torch.exp(ll)) for ll in _response_loglik(logp, part)]
                if consensus is not None:
                    n_pos = logp.shape[0]
                    c_ids = torch.from_numpy(consensus[0][offset:offset + n_pos]).to(logp.device)
                    c_p = torch.from_numpy(consensus[1][offset:offset + n_pos]).to(logp.device, logp.dtype)
                    kls.append(float(_sparse_kl(logp, c_ids, c_p).sum()))
                offset += logp.shape[0]
        finally:
            if was_training:
                self.model.train()
        total = offset
        return ProbeAnswer(positions=[n for _, n in rows], ids=np.concatenate(ids_out).astype(np.int64),
                           logprobs=np.concatenate(lp_out).astype(np.float32),
                           confidence=np.asarray(conf, dtype=np.float32),
                           kl=sum(kls) / total if consensus is not None and total else None)

    # -- training -----------------------------------------------------------------------------
    def fit(self, examples: Sequence[Example], cfg: FitConfig, *, memory: FitMemory | None = None,
            progress: ProgressFn | None = None, should_stop: StopFn | None = None,
            distill: Distill | None = None) -> FitResult:
        """LoRA's ``fit``; with ``distill``, every step's loss adds the distillation term."""
        self._distill = distill
        if distill is not None:
            self._probe_rows = self.probe_rows(distill.probes, distill.max_response_tokens, cfg.max_seq_len)
            counts = np.array([n for _, n in self._probe_rows], dtype=np.int64)
            self._offsets = np.concatenate([[0], np.cumsum(counts)])
            if int(self._offsets[-1]) != distill.ids.shape[0]:
                raise ValueError(f"the consensus has {distill.ids.shape[0]} positions; this tokenizer gives "
                                 f"{int(self._offsets[-1])} on the probe set")
            if distill.select not in ("all", "better"):
                raise ValueError(f"distillation select must be 'all' or 'better', got {distill.select!r}")
            self._consensus_ll = consensus_loglik(self._probe_rows, distill.ids, distill.probs)
            self.kd_probes_drawn = self.kd_probes_used = 0
            self._probe_rng = random.Random(cfg.seed + 1)
        try:
            return super().fit(examples, cfg, memory=memory, progress=progress, should_stop=should_stop)
        finally:
            self._distill = None

    def _accumulate(self, rows: Sequence[Row], step: int, micro_batch: int | None) -> tuple[float, int]:
        value, tokens = super()._accumulate(rows, step, micro_batch)
        d = self._distill
        if d is None or d.lam == 0:
            return value, tokens
        chosen = self._probe_rng.sample(range(len(self._probe_rows)), min(d.probe_batch_size, len(self._probe_rows)))
        part = [self._probe_rows[j] for j in chosen]
        logits = self._probe_logits(part)
        self.kd_probes_drawn += len(chosen)
        if d.select == "better":
            keep = self._consensus_better(chosen, part, logits)
            self.kd_probes_used += len(keep)
            if not keep:
                self.last_kd_loss = 0.0
                return value, tokens
            rows_at = np.concatenate([[0], np.cumsum([n for _, n in part])])
            logits = logits[torch.from_numpy(np.concatenate([np.arange(rows_at[i], rows_at[i + 1]) for i in keep]))]
            chosen = [chosen[i] for i in keep]
        else:
            self.kd_probes_used += len(chosen)
        sel = np.concatenate([np.arange(self._offsets[j], self._offsets[j + 1]) for j in chosen])
        logp = torch.log_softmax(logits / d.temperature, dim=-1)
        c_ids = torch.from_numpy(d.ids[sel]).to(logp.device)
        c_p = torch.from_numpy(d.probs[sel]).to(logp.device, logp.dtype)
        kd = _sparse_kl(logp, c_ids, c_p).mean() * (d.temperature ** 2)
        if not torch.isfinite(kd):
            raise FloatingPointError(f"non-finite distillation loss at step {step + 1}")
        (d.lam * kd).backward()
        self.last_kd_loss = float(kd.detach())
        return value + d.lam * self.last_kd_loss, tokens

    def _consensus_better(self, chosen: Sequence[int], part: Sequence[tuple[Row, int]],
                          logits: torch.Tensor) -> list[int]:
        """Indices into ``chosen`` of the probes whose response the consensus explains better (higher
        mean log-likelihood) than the model does now (temperature 1, no gradient)."""
        with torch.no_grad():
            own = _response_loglik(torch.log_softmax(logits.detach(), dim=-1), part)
        return [i for i, ll in enumerate(own) if float(ll) < self._consensus_ll[chosen[i]]]


def _response_targets(part: Sequence[tuple[Row, int]]) -> list[int]:
    """The response tokens of ``part`` in position order (the labels that are not -100)."""
    return [t for (_, lab), _ in part for t in lab if t != -100]


def _response_loglik(logp: torch.Tensor, part: Sequence[tuple[Row, int]]) -> list[torch.Tensor]:
    """Per probe of ``part``: the mean log-likelihood of its response tokens under ``logp``
    ([positions of ``part``, vocab]): the log of the probe's confidence."""
    targets = torch.tensor(_response_targets(part), device=logp.device)
    tok_lp = logp.gather(1, targets[:, None])[:, 0]
    out, pos = [], 0
    for _, n in part:
        out.append(tok_lp[pos:pos + n].mean())
        pos += n
    return out


def consensus_loglik(rows: Sequence[tuple[Row, int]], ids: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Per probe: the mean over its response tokens of log c(token), c the consensus at that
    position (``OUTSIDE_SUPPORT`` for a token the consensus does not keep)."""
    out, pos = np.zeros(len(rows)), 0
    for j, (row, n) in enumerate(rows):
        targets = np.array(_response_targets([(row, n)]), dtype=np.int64)
        hit = ids[pos:pos + n] == targets[:, None]
        p = np.where(hit.any(axis=1), (probs[pos:pos + n] * hit).sum(axis=1), 0.0)
        out[j] = float(np.log(np.maximum(p, OUTSIDE_SUPPORT)).mean())
        pos += n
    return out


def _sparse_kl(logp: torch.Tensor, c_ids: torch.Tensor, c_p: torch.Tensor) -> torch.Tensor:
    """Per position: sum over the consensus support of c (log c - log p)."""
    gathered = logp.gather(1, c_ids)
    mask = c_p > 0
    log_c = torch.where(mask, c_p, torch.ones_like(c_p)).log()
    return torch.where(mask, c_p * (log_c - gathered), torch.zeros_like(c_p)).sum(dim=1)


METHOD = KdMethod
