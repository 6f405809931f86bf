"""The agent's side of memory budgets: plan, refuse, guard, lower after an over-budget round.

``MemoryManager`` holds the budget (``AgentConfig.memory_budget``), the plan chosen for the
adapter and fit settings of the federation, the runtime guard and what it measured. The agent
asks it for a plan before building its training method, installs the plan's micro-batch and the
guard into the method, and reports the plan, a refusal or an over-budget round in its status.

Crash-loop protection: the state file (``agent.json``) records a fit in progress; a process that
finds such a record at start was killed during that fit (the kernel's OOM killer, a cgroup's
``MemoryMax``), so it lowers the plan as it would after an over-budget round. The factor by
which measurements exceeded estimates is kept there too and applied to every later plan.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import TYPE_CHECKING, Any, Protocol

from edge_agent.memory.budget import Budget, BudgetTooSmall, round_mb
from edge_agent.memory.estimator import DeviceKind, ModelShape
from edge_agent.memory.planner import Plan, PlanKey, candidate_plans, choose_plan, lower_plan, rank
from fedmq_protocol import messages as m

if TYPE_CHECKING:
    from edge_agent.config import AgentConfig
    from edge_agent.memory.guard import MemoryGuard, OverBudget

log = logging.getLogger("fedmq.agent")

KILLED_FIT_FACTOR = 1.25  # estimates are raised by this much after a fit that never finished


class PlanRefused(RuntimeError):
    """No plan fits the memory budget (the message names the smallest budget that would)."""


class StateStore(Protocol):
    """Where the agent persists its state (``edge_agent.agent.AgentStateFile``)."""

    data: dict[str, Any]

    def save(self) -> None: ...


class Guarded(Protocol):
    """A training method the plan is installed into (``edge_agent.methods.base.TrainingMethod``)."""

    micro_batch: int | None
    guard: Any


def _plan_key(value: Any) -> PlanKey | None:
    """A persisted plan key (a list); None when there is none (or it is not one)."""
    return PlanKey(*value) if value and len(value) == len(PlanKey._fields) else None


class MemoryManager:
    def __init__(self, config: AgentConfig, state_file: StateStore | None = None, *, method: str | None = None) -> None:
        """``method``: whose memory the plans estimate (default ``config.method``; a mode whose
        trainer the estimator does not know names the one that bounds it, AgentMode.planned_as)."""
        self.cfg = config
        self.method = method or config.method
        self.mb_cfg = config.memory_budget
        self.state_file = state_file
        self.device: DeviceKind = "cpu"
        self.shape: ModelShape | None = None
        self.plan: Plan | None = None
        self.refused: str | None = None
        self.min_host_mb: float | None = None
        self.min_gpu_mb: float | None = None
        self.over_budget: m.OverBudgetReport | None = None
        self.load_peak_host_mb: float | None = None
        self.guard: MemoryGuard | None = None
        self._inputs: dict[str, Any] | None = None
        data = state_file.data if state_file is not None else {}
        self.scale = float(data.get("memory_scale", 1.0))  # measured / estimated, from past rounds
        self._lowered_from = _plan_key(data.get("memory_lowered_from"))

    # ------------------------------------------------------------------ budget
    @property
    def bounded(self) -> bool:
        return self.mb_cfg is not None

    def budget(self) -> Budget:
        return self.mb_cfg.budget(self.device) if self.mb_cfg is not None else Budget()

    def limit(self) -> Budget:
        return self.mb_cfg.limit(self.device) if self.mb_cfg is not None else Budget()

    def prepare(self, model_path: str, device: str) -> None:
        """Read the model's shape; notice a fit killed in the previous process; plan with the
        inputs last seen (persisted) or the defaults, so the first announcement carries a plan."""
        self.device = "cuda" if device.startswith("cuda") else "cpu"
        try:
            self.shape = ModelShape.from_path(model_path)
        except ValueError as exc:
            self.shape = None
            if self.bounded:
                raise
            log.info("no memory estimate: %s", exc)
            return
        data = self._data()
        running = data.pop("memory_fit_running", None)
        if running:
            self.scale *= KILLED_FIT_FACTOR
            data["memory_scale"] = self.scale
            self._lowered_from = _plan_key(running.get("key"))
            data["memory_lowered_from"] = list(self._lowered_from) if self._lowered_from else None
            log.warning("the previous run was killed during a fit with plan %s (estimate %.0f MiB): "
                        "estimates are now raised %.2fx", running.get("label"), running.get("estimate_host_mb", 0),
                        self.scale)
            self._save()
        inputs = data.get("memory_inputs") or {}
        adapter = m.AdapterSpec.model_validate(inputs["adapter"]) if inputs.get("adapter") else m.AdapterSpec()
        with contextlib.suppress(PlanRefused):  # a refusal is recorded and announced by plan_for
            cut = inputs.get("cut")
            self.plan_for(adapter, self.last_fit(), zo_target=inputs.get("zo_target"),
                          cut=(int(cut[0]), int(cut[1])) if cut else None)

    def last_fit(self) -> m.FitConfig:
        """Fit settings of the last task planned for (persisted), else the protocol defaults."""
        inputs = self._data().get("memory_inputs") or {}
        d = m.FitConfig()
        return m.FitConfig(batch_size=inputs.get("batch_size", d.batch_size),
                           max_seq_len=inputs.get("seq_len", d.max_seq_len))

    # ------------------------------------------------------------------ planning
    def _kwargs(self, adapter: m.AdapterSpec, fit: m.FitConfig, zo_target: str | None,
                cut: tuple[int, int] | None = None) -> dict[str, Any]:
        o = self.cfg.training
        mb = self.mb_cfg
        bf16 = self.cfg.dtype == "bfloat16" or (self.cfg.dtype == "auto" and self.device == "cuda")
        return {"method": self.method, "batch_size": fit.batch_size, "seq_len": fit.max_seq_len,
                "lora_r": adapter.r, "target_modules": tuple(adapter.target_modules), "device": self.device,
                "dtype": "bfloat16" if bf16 else "float32",
                "allow_4bit": mb.allow_4bit if mb else False, "allow_zo": mb.allow_zo if mb else False,
                "force_checkpointing": o.gradient_checkpointing, "zo_target": zo_target,
                **({"cut": cut} if cut is not None else {})}

    def _scaled_budget(self) -> Budget:
        return self.budget().scaled_down(self.scale)

    def plan_for(self, adapter: m.AdapterSpec, fit: m.FitConfig, zo_target: str | None = None,
                 cut: tuple[int, int] | None = None) -> Plan | None:
        """The plan for these inputs (PlanRefused when nothing fits). None without a model shape,
        or for a split device before a task has named its cut (``cut``: (l_head, l_tail))."""
        if self.shape is None or (self.method == "split" and cut is None):
            return None
        inputs: dict[str, Any] = {"adapter": adapter.model_dump(mode="json"), "batch_size": fit.batch_size,
                                  "seq_len": fit.max_seq_len, "zo_target": zo_target}
        if cut is not None:
            inputs["cut"] = [int(cut[0]), int(cut[1])]
        if inputs == self._inputs and (self.plan is not None or self.refused):
            if self.refused:
                raise PlanRefused(self.refused)
            return self.plan
        kwargs = self._kwargs(adapter, fit, zo_target, cut)
        budget = self._scaled_budget()
        try:
            plan = choose_plan(self.shape, budget, **kwargs)
            if self._lowered_from is not None:
                # after an over-budget round (or a killed fit): strictly below that plan
                plans = candidate_plans(self.shape, **kwargs)
                below = rank(plans, self._lowered_from)
                if below >= 0 and rank(plans, plan.key) <= below:
                    plan = lower_plan(plans[below], self.shape, budget, **kwargs)
        except BudgetTooSmall as exc:
            self._set_refused(exc)
            self._inputs = inputs
            raise PlanRefused(self.refused) from None
        if self.scale != 1.0:
            log.info("memory estimates scaled by %.2f (measured above estimates before)", self.scale)
        changed = self.plan is None or plan.key != self.plan.key
        self.plan, self.refused, self.min_host_mb, self.min_gpu_mb = plan, None, None, None
        self._inputs = inputs
        data = self._data()
        if data.get("memory_inputs") != inputs:
            data["memory_inputs"] = inputs
            self._save()
        if changed:
            log.info("memory plan (budget %s): %s", self.limit().describe() if self.bounded else "none", plan.label())
        return plan

    def _set_refused(self, exc: BudgetTooSmall) -> None:
        """One message naming the budget configured, the cheapest plan and the budget it needs
        (its estimate, raised by any excess measured before, plus the safety margin)."""
        self.plan = None
        self.min_host_mb = None if exc.min_host_mb is None else math.ceil(exc.min_host_mb * self.scale / self._keep())
        self.min_gpu_mb = None if exc.min_gpu_mb is None else math.ceil(exc.min_gpu_mb * self.scale / self._keep())
        name = self.shape.name if self.shape is not None else "the model"
        if exc.smallest is None or self.min_host_mb is None:
            self.refused = f"memory budget {self.limit().describe()} holds no training plan for {name}"
        else:
            need = f"host_mb: {self.min_host_mb}" + (f", gpu_mb: {self.min_gpu_mb}" if self.min_gpu_mb else "")
            extra = [f"{100 * (1 - self._keep()):.0f} % safety margin"] if self._keep() != 1.0 else []
            if self.scale != 1.0:
                extra.insert(0, f"estimates raised {self.scale:.2f}x by earlier measurements")
            self.refused = (f"memory budget {self.limit().describe()} is too small to train {name}: the smallest "
                            f"plan is {exc.smallest.label()}; set memory_budget to at least {need}"
                            + (f" ({', '.join(extra)})" if extra else "") + (f"; {exc.hint}" if exc.hint else ""))
        log.error("refusing to train: %s", self.refused)

    def _keep(self) -> float:
        return 1.0 - self.mb_cfg.safety_margin if self.mb_cfg is not None else 1.0

    # ------------------------------------------------------------------ running
    def install(self, method: Guarded) -> None:
        """Give ``method`` the plan's micro-batch and a guard measuring every step."""
        from edge_agent.memory.guard import MemoryGuard

        if self.plan is not None:
            method.micro_batch = self.plan.micro_batch
        if self.guard is None:
            enforce = self.mb_cfg is not None and self.mb_cfg.guard
            self.guard = MemoryGuard(self.limit() if enforce else Budget())
        method.guard = self.guard

    def fit_started(self) -> None:
        if self.guard is not None:
            self.guard.start_round()
        if self.plan is not None and self.bounded:
            self._data()["memory_fit_running"] = {"key": list(self.plan.key), "label": self.plan.label(),
                                                 "estimate_host_mb": self.plan.estimate_host_mb}
            self._save()

    def fit_finished(self) -> None:
        if self._data().pop("memory_fit_running", None) is not None:
            self._save()

    def on_over_budget(self, exc: OverBudget, task: m.Task) -> None:
        """Record the report, raise estimates by what was measured, and lower the plan."""
        self.fit_finished()
        self.over_budget = m.OverBudgetReport(task_id=task.task_id, round=task.round, **{
            k: v for k, v in exc.figures().items() if k in m.OverBudgetReport.model_fields})
        current = self.plan
        log.warning("round %d stopped: %s (plan: %s)", task.round, exc, current.label() if current else "none")
        if current is None or self.shape is None:
            return
        if exc.peak_host_mb and current.estimate_host_mb:
            self.scale = max(self.scale, exc.peak_host_mb / current.estimate_host_mb)
        if exc.peak_gpu_mb and current.estimate_gpu_mb:
            self.scale = max(self.scale, exc.peak_gpu_mb / current.estimate_gpu_mb)
        self._lowered_from = current.key
        data = self._data()
        data["memory_scale"] = self.scale
        data["memory_lowered_from"] = list(self._lowered_from)
        self._save()
        self._inputs = None  # re-plan for the next task
        try:
            kwargs = self._kwargs(m.AdapterSpec.model_validate(data["memory_inputs"]["adapter"]),
                                  m.FitConfig(batch_size=current.batch_size, max_seq_len=current.seq_len),
                                  current.zo_target, current.cut)
            self.plan = lower_plan(current, self.shape, self._scaled_budget(), **kwargs)
            log.warning("next rounds: %s", self.plan.label())
        except BudgetTooSmall as exc2:
            self._set_refused(exc2)

    def load_measured(self, peak_host_mb: float) -> None:
        self.load_peak_host_mb = peak_host_mb

    # ------------------------------------------------------------------ reporting
    def status(self) -> m.DeviceMemory | None:
        if not self.bounded and self.plan is None and self.guard is None:
            return None
        lim = self.limit()
        g = self.guard
        last = g.last if g is not None else None
        return m.DeviceMemory(
            budget_host_mb=lim.host_mb, budget_gpu_mb=lim.gpu_mb,
            plan=m.MemoryPlan(**self.plan.to_info()) if self.plan is not None else None,
            refused=self.refused, min_host_mb=self.min_host_mb, min_gpu_mb=self.min_gpu_mb,
            over_budget=self.over_budget,
            peak_host_mb=round_mb(g.round_peak_host_mb) if g is not None and g.round_peak_host_mb else None,
            peak_gpu_mb=round_mb(g.round_peak_gpu_mb) if g is not None else None,
            step_peak_host_mb=round_mb(last.peak_host_mb) if last is not None else None,
            step_peak_gpu_mb=round_mb(last.peak_gpu_mb) if last is not None else None,
            load_peak_host_mb=round_mb(self.load_peak_host_mb),
        )

    # ------------------------------------------------------------------ persistence
    def _data(self) -> dict[str, Any]:
        return self.state_file.data if self.state_file is not None else {}

    def _save(self) -> None:
        if self.state_file is not None:
            try:
                self.state_file.save()
            except OSError as exc:
                log.warning("could not save the agent state: %s", exc)
