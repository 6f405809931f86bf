"""Federated knowledge distillation over logits (KD-FedLLM): probe set, update, consensus.

Torch-free: the coordinator combines the devices' sparse distributions with numpy alone.

- The **probe set** is public text, ``{"prompt", "response"}`` records (JSONL, named by the
  coordinator's ``kd.probe_path``). It reaches the devices through the broker, retained and
  chunked (``{base}/kd/probes``), with a manifest (SHA-256 of its canonical bytes, probe count,
  the federation's tokenizer fingerprint); every task repeats the manifest.
- **Positions distilled** are the tokens of each probe's public response (the device's own prompt
  template before them), at most ``max_response_tokens`` a probe: position t of a probe is the
  next-token distribution that predicts response token t. Devices sharing a tokenizer agree on
  these positions token for token, whatever their architecture.
- A device's **update** (``KdUpdate``): per position its top-k next-token ids and log-probs (two
  tensors of shape [positions, k] through the tensor codec: ids exact float32, log-probs float16
  / int8, zstd) plus one confidence per probe (exp of the mean log-likelihood of its response).
- The **consensus** (``KdConsensus``, retained on ``{base}/kd/consensus``): per position a sparse
  distribution (ids + probabilities, [positions, consensus_k]) combined from the devices'
  renormalised top-k by ``consensus`` below.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmq_protocol.codec import CodecSpec, EncodedTensors, encode
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.modes.base import ModePayload
from fedmq_protocol.wire import Message, OmitsDefaults

MAX_TOP_K = 128  # FedMKT keeps 128 per token
MAX_PROBES = 65536
MAX_POSITIONS = 1 << 22  # positions of one probe set (sum over probes)
LOGPROB_TOLERANCE = 0.05  # quantised log-probs may round a little above 0 / their mass above 1
Weighting = Literal["samples", "confidence", "best"]
Selection = Literal["all", "better"]
LogprobFormat = Literal["float32", "float16", "int8"]


class Probe(BaseModel):
    """One public probe: a prompt and a public response (the distilled positions)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    prompt: str = Field(min_length=1, max_length=1 << 16)
    response: str = Field(min_length=1, max_length=1 << 16)


def canonical_probes(probes: Sequence[Probe]) -> bytes:
    """The bytes the probe set's SHA-256 is over: one sorted-key JSON object a line, UTF-8."""
    return b"".join(json.dumps({"prompt": p.prompt, "response": p.response}, sort_keys=True,
                               ensure_ascii=False).encode() + b"\n" for p in probes)


def probe_sha256(probes: Sequence[Probe]) -> str:
    return hashlib.sha256(canonical_probes(probes)).hexdigest()


def load_probes(path: str | Path, where: str = "kd.probe_path") -> list[Probe]:
    """The probe set in a JSONL file (``prompt`` and ``response`` per line; other keys, such as a
    task family, are ignored); ValueError naming the file and line."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ValueError(f"{where}: cannot read probe set {str(p)!r}: {exc.strerror or exc}") from None
    out: list[Probe] = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not a JSON object")
            out.append(Probe(prompt=obj.get("prompt"), response=obj.get("response")))
        except ValueError as exc:
            first = str(exc).splitlines()
            reason = "prompt and response must be non-empty strings" if "validation error" in str(exc) else first[0]
            raise ValueError(f"{where}: {p}:{no}: {reason}") from None
    if not out:
        raise ValueError(f"{where}: probe set {str(p)!r} holds no probes")
    if len(out) > MAX_PROBES:
        raise ValueError(f"{where}: probe set {str(p)!r} holds {len(out)} probes, limit {MAX_PROBES}")
    return out


class KdOptions(BaseModel):
    """The coordinator's ``kd:`` section."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    probe_path: Path = Field(description="public probe set: JSONL with prompt and response per line")
    top_k: int = Field(16, ge=1, le=MAX_TOP_K, description=f"next-token log-probs a device sends per position "
                       f"(at most {MAX_TOP_K}); an update with more is refused")
    consensus_k: int | None = Field(None, ge=1, le=MAX_TOP_K, description="tokens kept per position in the "
                                    "consensus (renormalised); null: top_k")
    weighting: Weighting = Field("samples", description="how devices combine: samples (by training samples), "
                                 "confidence (per probe, by the device's confidence on it), best (per probe, the "
                                 "most confident device alone: FedMKT's min-cross-entropy selection)")
    confidence_power: float = Field(1.0, gt=0, le=100, description="with weighting confidence, each device's "
                                    "confidence on a probe is raised to this power (confidence = exp(-mean NLL), "
                                    "so this is a softmax over the devices' log-likelihoods at temperature "
                                    "1/power): 1 the plain confidence, larger values approach best")
    lam: float = Field(1.0, ge=0, le=1000, alias="lambda",
                       description="weight of the distillation term: loss = LM + lambda * KL(consensus || model)")
    temperature: float = Field(1.0, gt=0, le=100, description="softmax temperature of the model in the KL "
                               "term (the term is scaled by temperature^2)")
    max_response_tokens: int = Field(32, ge=1, le=4096, description="response tokens distilled per probe")
    probe_batch_size: int = Field(4, ge=1, le=4096, description="probes in the distillation term of each step")
    logprob_values: LogprobFormat = Field("float16", description="codec of the uploaded log-probs")
    select: Selection = Field("all", description="probes a device distils on: all, or better (only those whose "
                              "public response the consensus gives a higher mean log-likelihood than the "
                              "device's own model does: FedMKT's min-cross-entropy choice between self and "
                              "consensus; keeps a device's own knowledge from being pulled towards a consensus "
                              "diluted by weaker models)")
    tokenizer: str | None = Field(None, max_length=64, description="fingerprint of the federation's tokenizer "
                                  "(edge_agent.models.tokenizer_fingerprint); null: the first device's fixes it")

    @model_validator(mode="after")
    def _probe_file(self) -> KdOptions:
        load_probes(self.probe_path)  # a missing or malformed probe set is a config error, named here
        return self

    @property
    def kept(self) -> int:
        return self.consensus_k or self.top_k


class KdManifest(BaseModel):
    """What identifies the probe set (in the retained probe set and in every task)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    count: int = Field(ge=1, le=MAX_PROBES)
    tokenizer: str | None = Field(None, max_length=64)


class KdProbeSet(Message):
    """The probe set (msgpack, retained and chunked on ``{base}/kd/probes``)."""

    max_msgpack_bytes: ClassVar[int] = 1 << 28
    manifest: KdManifest
    probes: tuple[Probe, ...] = Field(max_length=MAX_PROBES)

    @model_validator(mode="after")
    def _matches(self) -> KdProbeSet:
        if len(self.probes) != self.manifest.count:
            raise ValueError(f"probe set holds {len(self.probes)} probes, its manifest says {self.manifest.count}")
        if probe_sha256(self.probes) != self.manifest.sha256:
            raise ValueError("probe set does not hash to its manifest's sha256")
        return self


class KdTask(ModePayload, OmitsDefaults):
    """The ``kd`` part of a task: the probe set to answer on and the distillation settings."""

    mode: ClassVar[str] = "kd"
    # a task that distils on every probe keeps the bytes it had before ``select`` existed
    omitted_at_default: ClassVar[tuple[str, ...]] = ("select",)
    manifest: KdManifest
    top_k: int = Field(ge=1, le=MAX_TOP_K)
    lam: float = Field(ge=0, le=1000)
    temperature: float = Field(gt=0, le=100)
    max_response_tokens: int = Field(ge=1, le=4096)
    probe_batch_size: int = Field(ge=1, le=4096)
    logprob_values: LogprobFormat = "float16"
    consensus_round: int = Field(0, ge=0, description="the consensus to distil from (0: none yet)")
    select: Selection = "all"


class KdUpdate(ModePayload):
    """The ``kd`` part of a fit update."""

    mode: ClassVar[str] = "kd"
    probe_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tokenizer: str = Field(max_length=64)
    vocab_size: int = Field(ge=1, le=1 << 24)
    positions: tuple[int, ...] = Field(max_length=MAX_PROBES)  # per probe
    ids: dict[str, Any]  # codec map {"ids": [P, k]} (float32, exact integers)
    logprobs: dict[str, Any]  # codec map {"logprobs": [P, k]}
    confidence: bytes = Field(max_length=4 * MAX_PROBES)  # float32 per probe


class KdConsensus(Message, OmitsDefaults):
    """The consensus of one round (msgpack, retained and chunked on ``{base}/kd/consensus``)."""

    max_msgpack_bytes: ClassVar[int] = 1 << 28
    # a plain-confidence consensus keeps the bytes it had before ``confidence_power`` existed
    omitted_at_default: ClassVar[tuple[str, ...]] = ("confidence_power",)
    round: int = Field(ge=1)
    probe_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tokenizer: str = Field(max_length=64)
    vocab_size: int = Field(ge=1, le=1 << 24)
    positions: tuple[int, ...] = Field(max_length=MAX_PROBES)
    weighting: Weighting
    num_devices: int = Field(ge=1)
    ids: dict[str, Any]  # codec map {"ids": [P, K]}
    probs: dict[str, Any]  # codec map {"probs": [P, K]}, rows sum to 1 (zero-padded)
    confidence_power: float = Field(1.0, gt=0, le=100, description="the power confidences were raised to "
                                    "(weighting confidence; 1 otherwise)")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Validated (ids int64 [P, K], probs float64 [P, K])."""
        total = sum(self.positions)
        if any(p < 1 for p in self.positions) or total > MAX_POSITIONS:
            raise ProtocolError(f"consensus: every probe needs >= 1 position, {MAX_POSITIONS} in total at most")
        max_elements = total * MAX_TOP_K  # what the positions allow: nothing larger is decoded
        ids = _decode_one(self.ids, "ids", max_elements, "consensus ids")
        probs = _decode_one(self.probs, "probs", max_elements, "consensus probs").astype(np.float64)
        if ids.shape != probs.shape or ids.ndim != 2 or ids.shape[0] != total:
            raise ProtocolError(f"consensus: ids {list(ids.shape)} and probs {list(probs.shape)} must both be "
                                f"[{total}, K]")
        int_ids = _integral_ids(ids, self.vocab_size, "consensus")
        if not np.all(np.isfinite(probs)) or np.any(probs < 0):
            raise ProtocolError("consensus: probabilities must be finite and non-negative")
        if total and not np.allclose(probs.sum(axis=1), 1.0, atol=1e-3):
            raise ProtocolError("consensus: a position's probabilities do not sum to 1")
        return int_ids, probs


def _decode_one(obj: Any, name: str, max_elements: int, what: str) -> np.ndarray:
    decoded = EncodedTensors.from_wire(obj, what).decode(max_elements=max_elements, where=what)
    if set(decoded) != {name}:
        raise ProtocolError(f"{what}: expected one tensor {name!r}, got {sorted(decoded)}")
    return decoded[name].dense()


def _integral_ids(ids: np.ndarray, vocab_size: int, what: str) -> np.ndarray:
    if not np.all(np.isfinite(ids)) or np.any(ids != np.round(ids)):
        raise ProtocolError(f"{what}: token ids must be integers")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(np.sum((ids < 0) | (ids >= vocab_size)))
        raise ProtocolError(f"{what}: {bad} token ids outside the vocabulary [0, {vocab_size})")
    return ids.astype(np.int64)


def encode_topk(ids: np.ndarray, logprobs: np.ndarray, fmt: str = "float16") -> tuple[dict[str, Any], dict[str, Any]]:
    """The two codec maps of an update: ids exact (float32 holds integers below 2**24), log-probs in
    ``fmt``; both zstd."""
    id_map = encode({"ids": np.asarray(ids, dtype=np.float32)}, CodecSpec(values="float32", zstd=True)).to_wire()
    lp_map = encode({"logprobs": np.asarray(logprobs, dtype=np.float32)},
                    CodecSpec(values=fmt, zstd=True, auto_sparse=False)).to_wire()
    return id_map, lp_map


def encode_consensus(ids: np.ndarray, probs: np.ndarray) -> tuple[dict[str, Any], dict[str, Any]]:
    return (encode({"ids": np.asarray(ids, dtype=np.float32)}, CodecSpec(values="float32", zstd=True)).to_wire(),
            encode({"probs": np.asarray(probs, dtype=np.float32)}, CodecSpec(values="float32", zstd=True)).to_wire())


@dataclass(frozen=True)
class DeviceTopK:
    """A validated update, decoded: what ``consensus`` combines."""

    ids: np.ndarray  # int64 [P, k]
    logprobs: np.ndarray  # float64 [P, k]
    confidence: np.ndarray  # float64 [probes]
    num_samples: int


def validate_topk(u: KdUpdate, num_samples: int, *, manifest: KdManifest, top_k: int,
                  tokenizer: str | None, vocab_size: int | None, positions: Sequence[int] | None) -> DeviceTopK:
    """Check an update against the federation; ProtocolError naming the first thing wrong.
    ``tokenizer``/``vocab_size``/``positions`` None: not fixed yet (this update would fix them)."""
    if u.probe_sha256 != manifest.sha256:
        raise ProtocolError(f"kd update answers probe set {u.probe_sha256[:12]}…; the federation's is "
                            f"{manifest.sha256[:12]}…")
    if tokenizer is not None and u.tokenizer != tokenizer:
        raise ProtocolError(f"kd update comes from tokenizer {u.tokenizer[:16]}…; the federation's tokenizer is "
                            f"{tokenizer[:16]}… (knowledge travels as token ids: devices must share a tokenizer)")
    if vocab_size is not None and u.vocab_size != vocab_size:
        raise ProtocolError(f"kd update has vocabulary size {u.vocab_size}; the federation's is {vocab_size}")
    if len(u.positions) != manifest.count:
        raise ProtocolError(f"kd update gives positions for {len(u.positions)} probes; the probe set has "
                            f"{manifest.count}")
    if positions is not None and tuple(u.positions) != tuple(positions):
        diff = next(i for i, (a, b) in enumerate(zip(u.positions, positions, strict=True)) if a != b)
        raise ProtocolError(f"kd update: probe {diff} has {u.positions[diff]} positions, the federation's "
                            f"tokenization gives {positions[diff]}")
    total = sum(u.positions)
    if any(p < 1 for p in u.positions) or total > MAX_POSITIONS:
        raise ProtocolError(f"kd update: every probe needs >= 1 position, {MAX_POSITIONS} in total at most")
    limit = total * MAX_TOP_K
    ids = _decode_one(u.ids, "ids", limit, "kd update ids")
    lp = _decode_one(u.logprobs, "logprobs", limit, "kd update logprobs").astype(np.float64)
    if ids.ndim != 2 or lp.shape != ids.shape or ids.shape[0] != total:
        raise ProtocolError(f"kd update: ids {list(ids.shape)} and logprobs {list(lp.shape)} must both be "
                            f"[{total} positions, k]")
    k = ids.shape[1]
    if not 1 <= k <= top_k:
        raise ProtocolError(f"kd update sends k={k} log-probs per position; the limit is top_k={top_k}")
    int_ids = _integral_ids(ids, u.vocab_size if vocab_size is None else vocab_size, "kd update")
    if k > 1 and np.any(np.diff(np.sort(int_ids, axis=1), axis=1) == 0):
        raise ProtocolError("kd update: a position lists a token id twice")
    if not np.all(np.isfinite(lp)):
        raise ProtocolError(f"kd update: {int(np.sum(~np.isfinite(lp)))} non-finite log-probs")
    if np.any(lp > LOGPROB_TOLERANCE) or np.any(np.exp(lp).sum(axis=1) > 1 + LOGPROB_TOLERANCE * k):
        raise ProtocolError("kd update: log-probs above 0 or a position's probability mass above 1")
    if len(u.confidence) != 4 * manifest.count:
        raise ProtocolError(f"kd update: {len(u.confidence)} confidence bytes, {manifest.count} probes need "
                            f"{4 * manifest.count}")
    conf = np.frombuffer(u.confidence, dtype="<f4").astype(np.float64)
    if not np.all(np.isfinite(conf)) or np.any(conf < 0) or np.any(conf > 1):
        raise ProtocolError("kd update: confidences must be finite and in [0, 1]")
    return DeviceTopK(ids=int_ids, logprobs=lp, confidence=conf, num_samples=num_samples)


def consensus(devices: Sequence[DeviceTopK], positions: Sequence[int], weighting: str,
              keep: int, power: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Per position: each device's top-k renormalised into a distribution q_i (zero outside its
    top-k), the weighted mean sum_i w_i q_i / sum_i w_i over the union of their ids, its ``keep``
    most probable tokens renormalised. Weights: ``samples`` n_i; ``confidence`` the device's
    confidence on the probe raised to ``power``; ``best`` 1 for the most confident device on the probe (first by
    order on ties), 0 for the others. Returns (ids int64 [P, keep], probs float64 [P, keep]);
    positions with fewer than ``keep`` candidates are padded with id 0 and probability 0. Ties are
    broken by the smaller token id, so the result does not depend on the devices' order."""
    if not devices:
        raise ValueError("consensus needs at least one device")
    probe_of = np.repeat(np.arange(len(positions)), positions)
    total = int(sum(positions))
    conf = np.stack([d.confidence for d in devices])  # [D, probes]
    if weighting == "samples":
        w = np.repeat(np.array([[float(d.num_samples)] for d in devices]), len(positions), axis=1)
    elif weighting == "confidence" and power == 1:  # the confidences themselves: the bits of plain weighting
        w = conf.copy()
    elif weighting == "confidence":  # conf ** power, scaled per probe by its largest so it cannot underflow
        log_c = np.log(np.maximum(conf, 1e-300))
        w = np.exp(power * (log_c - log_c.max(axis=0, keepdims=True)))
    elif weighting == "best":
        w = np.zeros_like(conf)
        w[np.argmax(conf, axis=0), np.arange(conf.shape[1])] = 1.0
    else:
        raise ValueError(f"unknown weighting {weighting!r}")
    w_pos = w[:, probe_of]  # [D, P]
    # an all-zero weight (no confidence anywhere) falls back to equal weights
    zero = w_pos.sum(axis=0) <= 0
    w_pos[:, zero] = 1.0
    w_pos = w_pos / w_pos.sum(axis=0, keepdims=True)
    cand_ids = np.concatenate([d.ids for d in devices], axis=1)  # [P, sum k]
    cand_p = np.concatenate([_renormalised(d.logprobs) * w_pos[i][:, None] for i, d in enumerate(devices)], axis=1)
    out_ids = np.zeros((total, keep), dtype=np.int64)
    out_p = np.zeros((total, keep), dtype=np.float64)
    for t in range(total):
        uniq, inv = np.unique(cand_ids[t], return_inverse=True)  # ascending ids
        mass = np.zeros(uniq.size)
        np.add.at(mass, inv, cand_p[t])
        order = np.lexsort((uniq, -mass))[:keep]  # most probable first, smaller id on ties
        order = order[mass[order] > 0]  # tokens only devices of weight 0 named are no candidates
        kept = mass[order]
        out_ids[t, :order.size] = uniq[order]
        out_p[t, :order.size] = kept / kept.sum() if kept.sum() > 0 else 1.0 / order.size
    return out_ids, out_p


def _renormalised(logprobs: np.ndarray) -> np.ndarray:
    z = logprobs - logprobs.max(axis=1, keepdims=True)
    e = np.exp(z)
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


def sparse_kl(target_ids: np.ndarray, target_p: np.ndarray, model_logprobs: np.ndarray) -> float:
    """Mean over positions of KL(target || model) over the target's support: sum_v c(v) (log c(v) -
    log p(v)), ``model_logprobs`` [P, vocab] (numpy reference of the agent's distillation term)."""
    gathered = np.take_along_axis(model_logprobs, target_ids, axis=1)
    mask = target_p > 0
    terms = np.where(mask, target_p * (np.log(np.where(mask, target_p, 1.0)) - gathered), 0.0)
    return float(terms.sum(axis=1).mean()) if terms.size else math.nan


def probes_topic(base: str) -> str:
    return f"{base}/kd/probes"


def consensus_topic(base: str) -> str:
    return f"{base}/kd/consensus"


#: the payloads this mode puts in messages (fedmq_protocol.modes registry)
PAYLOADS: dict[str, type[ModePayload]] = {"task": KdTask, "update": KdUpdate}
#: the coordinator config section of this mode (``kd:``)
OPTIONS = KdOptions
