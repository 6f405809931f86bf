"""The edge agent of a zeroth-order (FedKSeed) federation.

The global model is the base checkpoint plus the seed ledger. Ledger rounds arrive retained on
``{base}/zo/ledger/{round}``; the tensor-less global version N means "rounds 1..N replayed". An
agent replays, in order, every round it has not applied (a new or returning agent catches up the
same way). Before local training the trainable parameters are snapshotted to the state directory
and restored bit for bit before the next replay, so a device that trained ends bitwise equal to one
that did not, without holding a second copy of the model in memory.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.memory_guard import OverBudget
from fedmq_protocol import messages as m
from fedmq_protocol.errors import ProtocolError
from fedmq_protocol.topics import QOS_GLOBAL
from fedmq_protocol.modes.zo import ZoLedgerRound, ZoSpec, ZoUpdate, ledger_filter, ledger_topic, pack_pool

log = logging.getLogger("fedmq.agent")


class ZoEdgeAgent(EdgeAgent):
    def __init__(self, config: AgentConfig, **kwargs: Any) -> None:
        super().__init__(config, **kwargs)
        self.ledger: dict[int, ZoLedgerRound] = {}
        self.applied_round = 0  # ledger rounds replayed on the model in memory
        self._spec: ZoSpec | None = None
        self._method_key: tuple | None = None
        self._snapshot_path = Path(config.state_dir) / "zo-pre-round.pt"
        self.replay_s = 0.0  # time spent replaying the ledger (cumulative)

    # ------------------------------------------------------------------ wiring
    def start(self) -> None:
        self.transport.subscribe(
            ledger_filter(self.topics.base),
            lambda topic, payload: self._events.put(("ledger", topic, payload, time.time())),
            qos=QOS_GLOBAL, framed=True,
        )
        super().start()

    def _on_other_event(self, kind: str, topic: str, payload: bytes) -> None:
        if kind != "ledger" or not payload:
            return
        entry = ZoLedgerRound.from_msgpack(payload, max_bytes=self.cfg.broker.max_message_bytes)
        if topic != ledger_topic(self.topics.base, entry.round):
            raise ProtocolError(f"ledger round {entry.round} arrived on {topic!r}")
        self.ledger[entry.round] = entry

    def _on_task(self, payload: bytes) -> None:
        task = m.Task.from_msgpack(payload, max_bytes=self.cfg.broker.max_message_bytes)
        if task.payload is None:
            raise ProtocolError(f"task {task.task_id} carries no zo section; this device runs method zo")
        self._spec = task.payload
        super()._on_task(payload)

    # ------------------------------------------------------------------ model state
    def _current_spec(self) -> ZoSpec | None:
        if self._spec is not None:
            return self._spec
        return self.ledger[max(self.ledger)].spec if self.ledger else None

    def _ensure_method(self, adapter: m.AdapterSpec) -> None:
        spec = self._current_spec()
        target = spec.target if spec is not None else "full"
        key = (target, adapter if target == "lora" else None)
        self._memory_plan(adapter, zo_target=target)  # PlanRefused when the budget holds no plan
        if self.method is not None and self._method_key == key:
            self.memory.install(self.method)
            return
        from edge_agent.methods.zo import ZoMethod

        if self.cfg.training.torch_threads:
            import torch

            torch.set_num_threads(self.cfg.training.torch_threads)
        self._set_state("loading")
        log.info("loading %s for zeroth-order training of %s parameters", self.model_path, target)
        self.method = None
        self.method = ZoMethod(self.model_path, adapter, device=self.cfg.device, dtype=self.cfg.dtype, seed=0, target=target)
        self.memory.install(self.method)
        self._method_key, self._method_adapter = key, adapter
        # a fresh model holds no round: the newest global seen (self.sync) is pending again and
        # is reached by replaying the ledger from round 1
        self.global_version, self.global_arrays, self._dirty, self.applied_round = None, {}, False, 0
        self._set_state("idle")

    def _return_to_global(self) -> None:
        """Undo local training exactly (the pre-round snapshot), before any replay."""
        if self._dirty:
            self.method.restore(self._snapshot_path)
            self._dirty = False

    def _apply_pending_global(self) -> None:
        """Replay the ledger rounds between the weights in memory and the newest global seen."""
        if not self._global_pending():
            return
        version, adapter = self.sync.version, self.sync.adapter
        assert version is not None and adapter is not None
        self._ensure_method(adapter)
        if version < self.applied_round:  # the coordinator lost rounds: start over from the base
            log.warning("global v%d is behind the %d rounds applied; reloading the base", version, self.applied_round)
            self._method_key = None
            self._ensure_method(adapter)
        missing = [r for r in range(self.applied_round + 1, version + 1) if r not in self.ledger]
        if missing:
            return  # the retained ledger rounds are still on their way
        t0 = time.perf_counter()
        self._return_to_global()
        try:
            for r in range(self.applied_round + 1, version + 1):
                self.method.apply_round(self.ledger[r])
                self.applied_round = r
        except ValueError as exc:
            # a ledger this model cannot replay (other base, other target): forget the global
            # and wait for the next one rather than retrying every loop
            self.sync = type(self.sync)(max_elements=self.cfg.broker.max_message_bytes)
            self._count_rejection("ledger", f"global v{version}", f"cannot replay the seed ledger: {exc}")
            return
        self.replay_s += time.perf_counter() - t0
        self._global_timing["global_apply_s"] = time.perf_counter() - t0
        self._record_state(version)
        self.global_arrays, self.global_version = {}, version
        log.info("replayed the seed ledger up to round %d (global v%d)", self.applied_round, version)
        self.announce()

    def _record_state(self, version: int) -> None:
        """``zo-state.json`` in the state dir: which ledger the weights in memory replay and their
        digest (devices of one federation at one version must agree on it)."""
        import json

        from broker_coordinator.state import atomic_write

        doc = {"global_version": version, "applied_round": self.applied_round,
               "base_fingerprint": self.method.fingerprint, "target": self.method.target,
               "param_digest": self.method.param_digest(), "replay_s": self.replay_s}
        atomic_write(Path(self.cfg.state_dir) / "zo-state.json", json.dumps(doc).encode())

    def _wait_for_global(self, version: int, deadline: float) -> bool:
        if self.global_version == version:
            self._return_to_global()
        return super()._wait_for_global(version, deadline)

    # ------------------------------------------------------------------ training
    def _fit(self, task: m.Task) -> None:
        spec = task.payload
        assert spec is not None
        try:
            self.method.check_spec(spec)
        except ValueError as exc:
            log.error("task %s refused: %s", task.task_id, exc)
            return
        cfg = self._local_fit_config(task.fit)
        self._set_state("training")
        self.progress = {"round": task.round, "step": 0, "steps_total": cfg.local_steps}
        started = time.perf_counter()

        def progress(step: int, loss: float) -> None:
            self.alive_at = time.monotonic()
            self.progress.update(step=step, loss=float(loss), elapsed_s=time.perf_counter() - started)

        try:
            self.method.snapshot(self._snapshot_path)
            snapshot_s = time.perf_counter() - started
            self._dirty = True
            self.memory.fit_started()
            result = self.method.fit(
                self.train_examples, cfg, spec=spec, probabilities=spec.probability_array(),
                progress=progress, should_stop=self.stop_event.is_set,
            )
            self.memory.fit_finished()
        except OverBudget as exc:  # stopped cleanly; reported in the status, next plan lower
            self.memory.on_over_budget(exc, task)
            self._set_state("refused" if self.memory.refused else "idle")
            self.announce()
            return
        finally:
            if self.state == "training":
                self._set_state("idle")
        if self.stop_event.is_set():
            log.info("stopping: the update of %s is abandoned", task.task_id)
            return
        self.progress["tokens_per_s"] = result.tokens / result.seconds if result.seconds > 0 else None
        indices, g = pack_pool(self.method.last_pool)
        metrics = {
            "train_loss": float(result.train_loss),
            "steps": float(result.steps),
            "train_s": float(result.seconds),
            "snapshot_s": snapshot_s,
            **self._global_timing,
        }
        zo = ZoUpdate(base_fingerprint=self.method.fingerprint, indices=indices, g=g)
        self._send(task, task.global_version, result.num_samples, metrics, {}, zo=zo)
