"""KD-FedLLM: the coordinator side of federated knowledge distillation over logits (torch-free).

Nothing of a device's model travels: each device keeps its own model and adapter (devices may run
different architectures and sizes that share a tokenizer). The coordinator publishes the public
probe set (retained, chunked, ``{base}/kd/probes``), collects each round's top-k next-token
log-probs on it, combines them into a consensus per position (``fedmq_protocol.modes.kd.consensus``)
and publishes it retained on ``{base}/kd/consensus`` before the (tensor-less) global version that
names it. The first accepted update fixes the federation's tokenizer (unless ``kd.tokenizer``
names it), its vocabulary size and the positions per probe; updates that disagree are refused
with the reason, and counted by reason in the mode state.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from broker_coordinator.downlink import lossless
from broker_coordinator.modes import CoordinatorMode, RoundOutcome
from fedmq_protocol.codec import EncodedTensors
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.messages import GlobalModel, TaskKind, Update
from fedmq_protocol.modes.kd import (
    DeviceTopK,
    KdConsensus,
    KdManifest,
    KdOptions,
    KdProbeSet,
    KdTask,
    KdUpdate,
    consensus,
    consensus_topic,
    encode_consensus,
    load_probes,
    probe_sha256,
    probes_topic,
    validate_topk,
)

log = logging.getLogger("fedmq.coordinator")

if TYPE_CHECKING:
    from broker_coordinator.config import CoordinatorConfig
    from broker_coordinator.state import CoordinatorState, DeviceRecord

STATE_FORMAT = 1


def refusal_kind(reason: str) -> str:
    """The counter a refusal is filed under (the first words of its reason name it)."""
    for key, kind in (("probe set", "probe_hash"), ("tokenizer", "tokenizer"), ("vocabulary size", "vocab_size"),
                      ("must both be", "shape"), ("positions", "positions"),
                      ("outside the vocabulary", "out_of_vocabulary"), ("non-finite", "non_finite"),
                      ("limit is top_k", "k_over_limit"),
                      ("twice", "duplicate_ids"), ("confidence", "confidence"), ("log-probs above", "logprob_range")):
        if key in reason:
            return kind
    return "other"


class KdMode(CoordinatorMode):
    name = "kd"

    def __init__(self, config: CoordinatorConfig) -> None:
        super().__init__(config)
        spec = config.mode_options
        assert isinstance(spec, KdOptions)
        self.spec: KdOptions = spec
        self.probes = load_probes(spec.probe_path)
        self.sha256 = probe_sha256(self.probes)
        self.tokenizer: str | None = spec.tokenizer
        self.vocab_size: int | None = None
        self.positions: tuple[int, ...] | None = None
        self.consensus: KdConsensus | None = None
        self.refused: dict[str, int] = {}
        self.mismatched: dict[str, str] = {}  # device -> the other tokenizer its status named
        self.kl: dict[str, dict[str, dict[str, float]]] = {}  # round -> device -> kd metrics
        self._published: set[str] = set()

    # -- state ------------------------------------------------------------------------------
    def manifest(self) -> KdManifest:
        return KdManifest(sha256=self.sha256, count=len(self.probes), tokenizer=self.tokenizer)

    def restore(self, state: CoordinatorState) -> None:
        blob = state.mode_state if isinstance(state.mode_state, dict) else {}
        if not blob:
            return
        if blob.get("probe_sha256") not in (None, self.sha256):
            raise ValueError(f"kd.probe_path: {self.spec.probe_path} hashes to {self.sha256[:12]}…, but this "
                             f"federation started on probe set {blob['probe_sha256'][:12]}…; keep the probe set "
                             "or start a new state_dir")
        if self.spec.tokenizer is not None and blob.get("tokenizer") not in (None, self.spec.tokenizer):
            raise ValueError(f"kd.tokenizer {self.spec.tokenizer[:16]}… differs from the federation's "
                             f"{blob['tokenizer'][:16]}…")
        self.tokenizer = self.tokenizer or blob.get("tokenizer")
        self.vocab_size = blob.get("vocab_size")
        self.positions = tuple(blob["positions"]) if blob.get("positions") is not None else None
        raw = blob.get("consensus")
        cons = KdConsensus.model_validate(raw) if raw is not None else None
        # a consensus of a round the persisted state does not count as complete is dropped
        self.consensus = cons if cons is not None and cons.round <= state.round_completed else None
        self.refused = dict(blob.get("refused", {}))
        self.kl = {str(k): v for k, v in blob.get("kl", {}).items()}

    def state_blob(self) -> Any:
        return {"format": STATE_FORMAT, "probe_sha256": self.sha256, "tokenizer": self.tokenizer,
                "vocab_size": self.vocab_size, "positions": list(self.positions) if self.positions else None,
                "consensus": (None if self.consensus is None
                              else self.consensus.model_dump(by_alias=True, mode="python")),
                "refused": dict(self.refused), "kl": self.kl}

    # -- devices and tasks ------------------------------------------------------------------
    def accepts(self, device: DeviceRecord) -> bool:
        """kd devices, but not one whose status names another tokenizer than the federation's (it
        is never tasked; counted once per device under ``refused["tokenizer"]``)."""
        if device.method not in (None, "kd"):
            return False
        want = self.spec.tokenizer or self.tokenizer
        if device.tokenizer is None or want is None or device.tokenizer == want:
            return True
        if self.mismatched.get(device.device_id) != device.tokenizer:
            self.mismatched[device.device_id] = device.tokenizer
            self.refused["tokenizer"] = self.refused.get("tokenizer", 0) + 1
            log.warning("kd: device %s is not tasked: its tokenizer %s… is not the federation's %s…",
                        device.device_id, device.tokenizer[:12], want[:12])
        return False

    def initial_global(self) -> GlobalModel:
        return self._global(0, 0)  # nothing is shared but knowledge: version 0 is "no consensus yet"

    def _global(self, version: int, round_no: int) -> GlobalModel:
        return GlobalModel(version=version, round=round_no, adapter=self.cfg.adapter, model=self.cfg.model,
                           tensors=EncodedTensors(lossless({})))

    def task_payload(self, kind: TaskKind, round_no: int) -> KdTask:
        s = self.spec
        return KdTask(manifest=self.manifest(), top_k=s.top_k, lam=s.lam, temperature=s.temperature,
                      max_response_tokens=s.max_response_tokens, probe_batch_size=s.probe_batch_size,
                      logprob_values=s.logprob_values, select=s.select,
                      consensus_round=self.consensus.round if self.consensus is not None else 0)

    # -- updates ----------------------------------------------------------------------------
    def validate_update(self, update: Update) -> DeviceTopK:
        try:
            if update.payload is None:
                raise ProtocolError("kd federation: fit update carries no top-k log-probs")
            kd = update.payload_as(KdUpdate, "fit update")
            if not update.tensors.empty:
                raise ProtocolError("kd federation: fit update must not carry tensors (no adapter is averaged)")
            got = validate_topk(kd, update.num_samples, manifest=self.manifest(), top_k=self.spec.top_k,
                                tokenizer=self.tokenizer, vocab_size=self.vocab_size, positions=self.positions)
        except ProtocolError as exc:
            kind = refusal_kind(str(exc))
            self.refused[kind] = self.refused.get(kind, 0) + 1
            raise
        if self.tokenizer is None:
            self.tokenizer = kd.tokenizer  # the first device's tokenizer defines the federation's
        if self.vocab_size is None:
            self.vocab_size = kd.vocab_size
        if self.positions is None:
            self.positions = tuple(kd.positions)
        return got

    def aggregate(self, round_no: int, version: int, updates: Sequence[Update],
                  contributions: Sequence[Any]) -> RoundOutcome:
        if not updates:
            raise ValueError("aggregation needs at least one update")
        assert self.positions is not None and self.tokenizer is not None and self.vocab_size is not None
        ids, probs = consensus(list(contributions), self.positions, self.spec.weighting, self.spec.kept,
                               power=self.spec.confidence_power)
        id_map, p_map = encode_consensus(ids, probs)
        self.consensus = KdConsensus(round=round_no, probe_sha256=self.sha256, tokenizer=self.tokenizer,
                                     vocab_size=self.vocab_size, positions=self.positions,
                                     weighting=self.spec.weighting, num_devices=len(updates), ids=id_map, probs=p_map,
                                     confidence_power=(self.spec.confidence_power
                                                       if self.spec.weighting == "confidence" else 1.0))
        self.kl[str(round_no)] = {u.device_id: {k: float(v) for k, v in u.metrics.items() if k.startswith("kd_")}
                                  for u in updates}
        snapshot = self._global(version, round_no)
        return RoundOutcome(message=snapshot, snapshot=snapshot)

    def retained_messages(self, base_topic: str, everything: bool = False) -> list[tuple[str, bytes]]:
        out = []
        if everything or "probes" not in self._published:
            probe_set = KdProbeSet(manifest=self.manifest(), probes=tuple(self.probes))
            out.append((probes_topic(base_topic), probe_set.to_msgpack()))
            self._published.add("probes")
        if self.consensus is not None:
            key = f"consensus-{self.consensus.round}"
            if everything or key not in self._published:
                out.append((consensus_topic(base_topic), self.consensus.to_msgpack()))
                self._published.add(key)
        return out


MODE = KdMode
