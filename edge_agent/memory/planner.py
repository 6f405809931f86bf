"""Training plans: what a device runs for a round, in order from best to cheapest, and the choice.

A *plan* is the method (``lora`` on a float32 or bfloat16 base, ``qlora`` on a 4-bit NF4 base,
``zo`` zeroth-order on all parameters or on the LoRA adapter), the micro-batch with gradient
accumulation up to the round's batch size, and gradient checkpointing, with its estimated peak
(``edge_agent.memory.estimator``). ``choose_plan`` walks the plans from best (most faithful
training, least recompute) to cheapest and returns the first whose estimate fits the budget;
when none fits it raises ``BudgetTooSmall`` naming the smallest budget that would work.
``lower_plan`` picks the next cheaper plan after a round went over budget.

A split device (``method="split"``) has one plan per cut: the whole batch per step (the split
server sees one exchange per step), its estimate from ``estimate_split``. The task names the cut;
``split_cuts`` lists the cuts no larger than it (U-shape: at least one block at each end) and
``choose_cut`` returns the largest that fits a budget (what a refusal of the task's cut names).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, NoReturn

from edge_agent.memory.budget import Budget, BudgetTooSmall
from edge_agent.memory.estimator import (
    METHODS,
    Base,
    DeviceKind,
    Method,
    ModelShape,
    ZoTarget,
    estimate,
    estimate_split,
)


class PlanKey(NamedTuple):
    """A plan's place in the order of ``candidate_plans`` (persisted in the agent's state file as
    a list: a plan to stay below after an over-budget round or a killed fit)."""

    method: str
    base: str
    zo_target: str | None
    gradient_checkpointing: bool
    micro_batch: int


@dataclass(frozen=True)
class Plan:
    """What a device runs for a round, and what it is expected to use."""

    method: Method
    base: Base
    micro_batch: int
    grad_accum: int                # micro-batches per optimizer step (zo: forward chunks)
    gradient_checkpointing: bool
    batch_size: int                # the round's batch size (micro_batch × grad_accum ≥ it)
    seq_len: int
    device: DeviceKind = "cpu"
    zo_target: ZoTarget | None = None  # zo only
    estimate_host_mb: float = 0.0
    estimate_gpu_mb: float | None = None
    breakdown: Mapping[str, float] = field(default_factory=dict, compare=False)
    cut: tuple[int, int] | None = None  # split only: (l_head, l_tail) the device runs

    @property
    def is_zo(self) -> bool:
        return self.method == "zo"

    @property
    def is_gradient(self) -> bool:
        return not self.is_zo

    @property
    def on_nf4(self) -> bool:
        """The base weights are held in 4-bit NF4."""
        return self.base == "nf4"

    @property
    def key(self) -> PlanKey:
        return PlanKey(self.method, self.base, self.zo_target, self.gradient_checkpointing, self.micro_batch)

    @property
    def build_key(self) -> tuple[str, str, str | None, bool, str]:
        """Plans with the same key share a loaded model (micro-batch changes need no reload)."""
        return (self.method, self.base, self.zo_target, self.gradient_checkpointing, self.device)

    def label(self) -> str:
        base = "4-bit NF4" if self.on_nf4 else self.base
        if self.is_zo:
            what = "zo on all parameters" if self.zo_target == "full" else "zo on the LoRA adapter"
            head = f"{what} ({base} base)"
        elif self.cut is not None:
            head = f"split l_head={self.cut[0]} l_tail={self.cut[1]} ({base} base)"
        else:
            head = f"{self.method} ({base} base)"
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
        dtype = "float32" if self.on_nf4 else self.base
        if self.is_zo:
            # on the adapter: zo-adapter (edge_agent.methods.zo_adapter) sends adapter differences
            # like every other plan of an adapter federation; a zeroth-order federation's agent
            # builds ZoMethod itself
            name = "zo-adapter" if self.zo_target == "lora" else "zo"
            return name, {"dtype": dtype, "target": self.zo_target or "full"}
        return self.method, {"dtype": dtype, "gradient_checkpointing": self.gradient_checkpointing}

    def fits(self, budget: Budget) -> bool:
        if budget.host_mb is not None and self.estimate_host_mb > budget.host_mb:
            return False
        return not (budget.gpu_mb is not None and self.estimate_gpu_mb is not None
                    and self.estimate_gpu_mb > budget.gpu_mb)

    def scaled(self, factor: float) -> Plan:
        """The plan with its estimates raised ``factor`` times."""
        return replace(self, estimate_host_mb=self.estimate_host_mb * factor,
                       estimate_gpu_mb=None if self.estimate_gpu_mb is None else self.estimate_gpu_mb * factor)


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
    method: Method,
    batch_size: int,
    seq_len: int,
    lora_r: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    device: DeviceKind = "cpu",
    dtype: str = "float32",
    allow_4bit: bool = True,
    allow_zo: bool = True,
    force_checkpointing: bool = False,
    zo_target: ZoTarget | None = None,
    cut: tuple[int, int] | None = None,
) -> list[Plan]:
    """Every plan a device configured for ``method`` may run, best first.

    ``lora``: the configured base dtype (float32, then on CUDA bfloat16), then a 4-bit base
    (``allow_4bit``); ``qlora``: the 4-bit base. For each base: micro-batches from the whole batch
    down to 1 without, then with, gradient checkpointing. Then (``allow_zo``) zeroth-order on the
    same LoRA adapter over a 4-bit base: compatible with the other devices of the federation.
    ``zo`` (a zeroth-order federation): its ``zo_target`` only, at decreasing forward chunks.
    ``split``: the one plan of ``cut`` (l_head, l_tail), the whole batch per step."""
    if method == "split":
        if cut is None:
            raise ValueError("a split plan needs the cut (l_head, l_tail)")
        return [_split_plan(shape, cut, batch_size=batch_size, seq_len=seq_len, lora_r=lora_r,
                            target_modules=target_modules, device=device, dtype=dtype)]
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    plans: list[Plan] = []

    def add(m: Method, base: Base, mb: int, ckpt: bool, zt: ZoTarget | None = None) -> None:
        host, gpu, b = estimate(shape, method=m, base=base, micro_batch=mb, seq_len=seq_len,
                                gradient_checkpointing=ckpt, zo_target=zt, lora_r=lora_r,
                                target_modules=target_modules, device=device)
        plans.append(Plan(m, base, mb, math.ceil(batch_size / mb), ckpt, batch_size, seq_len, device, zt,
                          host, gpu, b))

    if method == "krso":
        # W is updated in place: a full-precision base only (no 4-bit fallback, no zo fallback)
        krso_base: Base = "bfloat16" if dtype == "bfloat16" else "float32"
        for ckpt in ((True,) if force_checkpointing else (False, True)):
            for mb in _micro_batches(batch_size):
                add("krso", krso_base, mb, ckpt)
        return plans
    if method == "zo":
        target: ZoTarget = zo_target or "full"
        zo_base: Base = "nf4" if target == "lora" else ("bfloat16" if dtype == "bfloat16" else "float32")
        for mb in _micro_batches(batch_size):
            add("zo", zo_base, mb, False, target)
        return plans
    bases: list[tuple[Method, Base]] = []
    if method == "lora":
        first: Base = "bfloat16" if dtype == "bfloat16" else "float32"
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


def rank(plans: Sequence[Plan], key: PlanKey | None) -> int:
    """The position of the plan ``key`` in ``plans`` (-1 when absent)."""
    keys = [p.key for p in plans]
    return keys.index(key) if key in keys else -1


def choose_plan(shape: ModelShape, budget: Budget, **kwargs: Any) -> Plan:
    """The first (best) of ``candidate_plans(shape, **kwargs)`` that fits ``budget``.

    Raises BudgetTooSmall with one message naming the smallest budget that would work."""
    plans = candidate_plans(shape, **kwargs)
    for p in plans:
        if p.fits(budget):
            return p
    _refuse(shape, budget, plans, hint=_cut_hint(shape, budget, plans, kwargs))


def _split_plan(shape: ModelShape, cut: tuple[int, int], *, batch_size: int, seq_len: int, lora_r: int,
                target_modules: Sequence[str], device: DeviceKind, dtype: str) -> Plan:
    base: Base = "bfloat16" if dtype == "bfloat16" else "float32"
    host, gpu, b = estimate_split(shape, l_head=cut[0], l_tail=cut[1], micro_batch=batch_size, seq_len=seq_len,
                                  base=base, lora_r=lora_r, target_modules=target_modules, device=device)
    return Plan("split", base, batch_size, 1, False, batch_size, seq_len, device, None, host, gpu, b,
                cut=(int(cut[0]), int(cut[1])))


def split_cuts(shape: ModelShape, l_head: int, l_tail: int) -> list[tuple[int, int]]:
    """The cuts ``(h, t)`` with ``1 <= h <= l_head`` and ``1 <= t <= l_tail`` (U-shape kept) that
    leave the split server at least one block, largest first: most device blocks, then the most
    even, then more at the head."""
    n = shape.num_layers
    cuts = [(h, t) for h in range(1, l_head + 1) for t in range(1, l_tail + 1) if h + t < n]
    return sorted(cuts, key=lambda c: (-(c[0] + c[1]), abs(c[0] - c[1]), -c[0]))


def choose_cut(shape: ModelShape, budget: Budget, *, l_head: int, l_tail: int, batch_size: int, seq_len: int,
               lora_r: int = 8, target_modules: Sequence[str] = ("q_proj", "v_proj"),
               device: DeviceKind = "cpu", dtype: str = "float32") -> Plan:
    """The split plan of the largest cut no larger than ``(l_head, l_tail)`` that fits ``budget``
    (fewer blocks on the device: the split server runs more). BudgetTooSmall when even
    ``l_head = l_tail = 1`` does not fit, naming the budget that cut needs."""
    plans = [_split_plan(shape, c, batch_size=batch_size, seq_len=seq_len, lora_r=lora_r,
                         target_modules=target_modules, device=device, dtype=dtype)
             for c in split_cuts(shape, l_head, l_tail)]
    for p in plans:
        if p.fits(budget):
            return p
    _refuse(shape, budget, plans)


def _cut_hint(shape: ModelShape, budget: Budget, plans: Sequence[Plan], kwargs: Mapping[str, Any]) -> str | None:
    """For a split plan that does not fit: the largest smaller cut that would, or that none does."""
    if len(plans) != 1 or plans[0].cut is None:
        return None
    p = plans[0]
    assert p.cut is not None
    try:
        fit = choose_cut(shape, budget, l_head=p.cut[0], l_tail=p.cut[1], batch_size=p.batch_size,
                         seq_len=p.seq_len, device=p.device, dtype=p.base,
                         lora_r=kwargs.get("lora_r", 8),
                         target_modules=kwargs.get("target_modules", ("q_proj", "v_proj")))
    except BudgetTooSmall:
        return "no smaller cut fits either (l_head = l_tail = 1 is the smallest)"
    assert fit.cut is not None
    return (f"the largest cut that fits is l_head={fit.cut[0]} l_tail={fit.cut[1]} (~{fit.estimate_host_mb:.0f} MiB; "
            "set the coordinator's split: section to it)")


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
    start = rank(plans, current.key) + 1
    scaled = [p.scaled(factor) for p in plans]
    for p in scaled[start:]:
        if p.fits(budget) and p.estimate_host_mb < current.estimate_host_mb * factor:
            return p
    _refuse(shape, budget, scaled[start:] or scaled)


def _refuse(shape: ModelShape, budget: Budget, plans: Sequence[Plan], hint: str | None = None) -> NoReturn:
    """Raise BudgetTooSmall for ``plans`` (none of which fits ``budget``), naming the cheapest
    plan and the budget it needs."""
    if not plans:
        raise BudgetTooSmall(f"no training plan for {shape.name}", min_host_mb=None)
    cheapest = min(plans, key=lambda p: (p.estimate_gpu_mb or 0.0, p.estimate_host_mb))
    need_host = math.ceil(cheapest.estimate_host_mb)
    need_gpu = None if cheapest.estimate_gpu_mb is None else math.ceil(cheapest.estimate_gpu_mb)
    need = f"{need_host} MiB host" + (f" and {need_gpu} MiB GPU" if need_gpu is not None else "")
    msg = (f"memory budget {budget.describe()} is too small to train {shape.name}: the smallest plan "
           f"({cheapest.label()}) needs {need}; set memory_budget to at least "
           f"host_mb: {need_host}" + (f", gpu_mb: {need_gpu}" if need_gpu is not None else "")
           + (f"; {hint}" if hint else ""))
    raise BudgetTooSmall(msg, min_host_mb=need_host, min_gpu_mb=need_gpu, smallest=cheapest, hint=hint)
