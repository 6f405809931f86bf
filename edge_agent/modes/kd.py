"""The knowledge-distillation mode (KD-FedLLM), agent side.

Each device trains its own model (any architecture or size sharing the federation's tokenizer):
its LoRA adapter never leaves it and is kept across rounds (``kd-adapter.npz`` in the state dir,
loaded again after a restart). The public probe set arrives retained on ``{base}/kd/probes``; the
consensus of the last round on ``{base}/kd/consensus``. A fit trains on the private data plus,
once there is a consensus, ``lam * KL(consensus || model)`` on the probe positions, then runs the
probe set and uploads its top-k next-token log-probs (``KdUpdate``), no tensors. The tensor-less
global version N means "the consensus of round N is out"; applying it sets nothing in the model.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edge_agent.modes import AgentMode, GlobalRejected, Subscription, TrainerChoice, UpdateContent, trainer_as
from fedmq_protocol.modes.kd import (
    KdConsensus,
    KdProbeSet,
    KdTask,
    KdUpdate,
    consensus_topic,
    encode_topk,
    probes_topic,
)
from fedmq_protocol.storage import atomic_write

if TYPE_CHECKING:
    from edge_agent.methods.base import FitResult, TrainingMethod
    from edge_agent.methods.kd import Distill, KdMethod
    from fedmq_protocol.globals import GlobalSync
    from fedmq_protocol.messages import AdapterSpec, Task

log = logging.getLogger("fedmq.agent")

ADAPTER_FILE = "kd-adapter.npz"


def _kd(trainer: TrainingMethod) -> KdMethod:
    from edge_agent.methods.kd import KdMethod

    return trainer_as(trainer, KdMethod, "kd")


class KdMode(AgentMode):
    name: ClassVar[str] = "kd"
    methods: ClassVar[tuple[str, ...]] = ("kd",)
    announces_tokenizer: ClassVar[bool] = True  # one tokenizer across the federation's models

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.probe_set: KdProbeSet | None = None
        self.latest: KdConsensus | None = None  # newest consensus received
        self.applied: KdConsensus | None = None  # the consensus of the global applied
        self._consensus_arrays: tuple[np.ndarray, np.ndarray] | None = None
        self._adapter_path = self.ctx.state_dir / ADAPTER_FILE
        self._kl_before: float | None = None

    # -- messages ---------------------------------------------------------------------------
    def subscriptions(self) -> list[Subscription]:
        base = self.ctx.topics.base
        return [Subscription(probes_topic(base), "probes"), Subscription(consensus_topic(base), "consensus")]

    def on_message(self, kind: str, topic: str, payload: bytes) -> None:
        if not payload:
            return
        if kind == "probes":
            self.probe_set = KdProbeSet.from_msgpack(payload, max_bytes=self.ctx.max_message_bytes)
        elif kind == "consensus":
            cons = KdConsensus.from_msgpack(payload, max_bytes=self.ctx.max_message_bytes)
            cons.arrays()  # ProtocolError when its ids or probabilities are malformed
            self.latest = cons

    def accept_task(self, task: Task) -> None:
        task.payload_as(KdTask, f"task {task.task_id}")

    # -- the trainer ------------------------------------------------------------------------
    def choose_trainer(self, adapter: AdapterSpec) -> TrainerChoice:
        plan = self.ctx.memory_plan(adapter)  # PlanRefused when the budget holds no plan
        kwargs: dict[str, Any] = {}
        if plan is not None:
            name, spec = plan.method_spec()
            if name == "lora":
                kwargs = spec
        key = (adapter, plan.build_key if plan is not None else None)
        return TrainerChoice("kd", kwargs, key, f"own lora adapter r={adapter.r} with distillation")

    def planned_as(self, method: str) -> str:
        return "lora"

    def trainer_loaded(self, trainer: TrainingMethod) -> None:
        """The device's own adapter of earlier rounds, when it has one."""
        self.applied = None
        if not self._adapter_path.exists():
            return
        try:
            with np.load(self._adapter_path) as z:
                trainer.set_state({k: z[k] for k in z.files})
            log.info("kd: resumed this device's adapter from %s", self._adapter_path)
        except (ValueError, OSError) as exc:  # another model or adapter than the one saved
            log.warning("kd: %s does not fit this model (%s); starting from a fresh adapter", self._adapter_path, exc)

    # -- the global -------------------------------------------------------------------------
    def can_reach(self, version: int) -> bool:
        if self.probe_set is None:
            return False
        return version == 0 or (self.latest is not None and self.latest.round >= version)

    def apply_global(self, trainer: TrainingMethod, version: int, sync: GlobalSync) -> None:
        method = _kd(trainer)
        if version == 0 or self.latest is None:
            return
        cons = self.latest
        if cons.tokenizer != method.tokenizer_fingerprint or cons.vocab_size != method.vocab_size:
            raise GlobalRejected("consensus", f"the consensus is over tokenizer {cons.tokenizer[:16]}… "
                                 f"({cons.vocab_size} ids); this model's is {method.tokenizer_fingerprint[:16]}… "
                                 f"({method.vocab_size} ids)")
        if self.probe_set is None or cons.probe_sha256 != self.probe_set.manifest.sha256:
            raise GlobalRejected("consensus", "the consensus answers another probe set than the one held")
        self.applied, self._consensus_arrays = cons, cons.arrays()

    def return_to_global(self, trainer: TrainingMethod) -> None:
        """Nothing: in kd the device's own adapter is its model, kept across rounds."""

    def global_digest(self) -> str:
        return f"kd:{self.applied.round if self.applied is not None else 0}"

    def state_record(self, version: int, trainer: TrainingMethod) -> dict[str, Any]:
        method = _kd(trainer)
        return {"global_version": version, "consensus_round": self.applied.round if self.applied else 0,
                "tokenizer": method.tokenizer_fingerprint, "model": method.model_path}

    # -- training ---------------------------------------------------------------------------
    def _task(self, task: Task) -> KdTask:
        return task.payload_as(KdTask, f"task {task.task_id}")

    def check_fit(self, task: Task, trainer: TrainingMethod) -> None:
        kd, method = self._task(task), _kd(trainer)
        if kd.manifest.tokenizer is not None and kd.manifest.tokenizer != method.tokenizer_fingerprint:
            raise ValueError(f"this device's tokenizer ({method.tokenizer_fingerprint[:16]}…) is not the "
                             f"federation's ({kd.manifest.tokenizer[:16]}…): its token ids mean other text")
        if self.probe_set is None or self.probe_set.manifest.sha256 != kd.manifest.sha256:
            raise ValueError(f"task {task.task_id} answers probe set {kd.manifest.sha256[:12]}…, which has not "
                             "arrived")

    def _distill(self, kd: KdTask) -> Distill | None:
        from edge_agent.methods.kd import Distill

        if self.applied is None or self._consensus_arrays is None or kd.lam == 0 or self.probe_set is None:
            return None
        ids, probs = self._consensus_arrays
        return Distill(self.probe_set.probes, ids, probs, kd.lam, kd.temperature, kd.max_response_tokens,
                       kd.probe_batch_size, select=kd.select)

    def prepare_fit(self, task: Task, trainer: TrainingMethod) -> dict[str, float]:
        self._kl_before = None
        if self._consensus_arrays is None or self.probe_set is None:
            return {}
        kd = self._task(task)
        answer = _kd(trainer).probe_topk(self.probe_set.probes, top_k=1, max_response_tokens=kd.max_response_tokens,
                                         max_len=task.fit.max_seq_len, consensus=self._consensus_arrays)
        self._kl_before = answer.kl
        return {} if answer.kl is None else {"kd_kl_before": answer.kl}

    def fit_options(self, task: Task) -> dict[str, Any]:
        return {"distill": self._distill(self._task(task))}

    def update_content(self, task: Task, trainer: TrainingMethod, result: FitResult) -> UpdateContent:
        kd, method = self._task(task), _kd(trainer)
        assert self.probe_set is not None
        answer = method.probe_topk(self.probe_set.probes, top_k=kd.top_k, max_response_tokens=kd.max_response_tokens,
                                   max_len=task.fit.max_seq_len, consensus=self._consensus_arrays)
        self._save_adapter(method)
        ids, lps = encode_topk(answer.ids, answer.logprobs, kd.logprob_values)
        payload = KdUpdate(probe_sha256=kd.manifest.sha256, tokenizer=method.tokenizer_fingerprint,
                           vocab_size=method.vocab_size, positions=tuple(answer.positions), ids=ids, logprobs=lps,
                           confidence=answer.confidence.astype("<f4").tobytes())
        metrics = {"tokens": float(result.tokens), "kd_confidence": float(np.mean(answer.confidence))}
        if answer.kl is not None:
            metrics["kd_kl"] = answer.kl
        if method.last_kd_loss is not None and self.applied is not None:
            metrics["kd_loss"] = method.last_kd_loss
            if method.kd_probes_drawn:  # share of the drawn probes distilled on (select: better)
                metrics["kd_probes_used"] = method.kd_probes_used / method.kd_probes_drawn
        return UpdateContent(metrics=metrics, payload=payload)

    def _save_adapter(self, method: KdMethod) -> None:
        buf = io.BytesIO()
        np.savez(buf, **method.get_state())  # type: ignore[arg-type]  # numpy's stub types the keywords as allow_pickle
        atomic_write(self._adapter_path, buf.getvalue())


__all__ = ["ADAPTER_FILE", "KdMode"]
MODE = KdMode
