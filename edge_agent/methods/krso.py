"""FedKRSO client: first-order training of every targeted linear weight inside random subspaces.

A fit runs ``cfg.local_steps`` steps in intervals of J (``KrsoSpec.interval``). Each interval draws
a seed s uniformly from the round's K, starts B = 0 (d_out x r) for every targeted linear W and
trains only the Bs, with Adam (fresh moments, no weight decay; gradients clipped to
``cfg.max_grad_norm`` as every gradient method here), in ``y = W x + B (P_s x)``; then it merges
``W += B P_s`` and adds B to ``acc[W][s]``. P_s (r x d_in) is the counter-based gaussian of
``param_seed(s, parameter index)`` (``zo_directions``, numpy backend) times float32(1/sqrt(r)):
the same bits on every device, thread count and backend.

A round of the ledger is applied (on the weights of the round's start, restored from the on-disk
snapshot) as ``W = float32(float64(W) + sum_t float64(B̄[:, t]) * float64(P[t, :]))`` over the
round's terms t = (seed in the round's order, row of P) in that order: products of two float32 are
exact in float64 and each element sees the same sequence of rounded additions, so every device ends
with the same bits whatever its BLAS, SIMD width or thread count (``apply_terms``).
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from edge_agent.data import Example
from edge_agent.methods import zo_directions
from edge_agent.methods.base import NO_PLAN, FitMemory, FitResult, ProgressFn, Row, StopFn, release_memory
from edge_agent.methods.lora import LoraMethod
from edge_agent.models import ALL_LINEAR, lora_target_modules, model_fingerprint
from fedmq_protocol.messages import AdapterSpec, FitConfig
from fedmq_protocol.modes.krso import KrsoLedgerRound, KrsoSpec, tensor_name, weights_digest
from fedmq_protocol.modes.zo import param_seed

APPLY_BLOCK_BYTES = 1 << 20  # rows of W per pass of apply_terms: a float64 block that stays in cache


def projection(seed: int, param_index: int, rank: int, d_in: int) -> np.ndarray:
    """P_s (rank x d_in, float32) of the parameter numbered ``param_index`` in the model."""
    z = zo_directions.draw(param_seed(seed, param_index), rank * d_in, "gaussian", backend="numpy")
    return (z * np.float32(1.0 / math.sqrt(rank))).reshape(rank, d_in)


def apply_terms(w: np.ndarray, b: np.ndarray, p: np.ndarray, backend: str = "numpy") -> None:
    """In place: w = float32(float64(w) + sum_t float64(b[:, t]) * float64(p[t, :])), t ascending,
    the sum accumulated from 0 before w is added.

    ``w`` (d_out x d_in) float32 contiguous, ``b`` (d_out x T), ``p`` (T x d_in). No BLAS, so no
    dependence on threads or instruction sets: ``numpy`` (element-wise float64, blocked over rows) or
    ``numba`` (a compiled loop without fast-math, so no fused multiply-add; ~30x faster, the same bits)."""
    if backend == "numba":
        _kernel()(w, np.ascontiguousarray(b, dtype=np.float64), np.ascontiguousarray(p, dtype=np.float64))
        return
    d_out, d_in = w.shape
    b64, p64 = b.astype(np.float64), p.astype(np.float64)
    rows = max(1, APPLY_BLOCK_BYTES // (8 * d_in))
    acc = np.empty((min(rows, d_out), d_in), dtype=np.float64)
    tmp = np.empty_like(acc)
    for lo in range(0, d_out, rows):
        hi = min(d_out, lo + rows)
        a, t_ = acc[: hi - lo], tmp[: hi - lo]
        a.fill(0.0)
        for t in range(b64.shape[1]):
            np.multiply(b64[lo:hi, t:t + 1], p64[t], out=t_)
            a += t_
        a += w[lo:hi]
        w[lo:hi] = a  # one rounding to float32


_apply_kernel: Any = None
_kernel_lock = threading.Lock()


def _kernel() -> Any:
    """The numba loop of ``apply_terms`` (compiled once per process; numba is imported only here)."""
    global _apply_kernel
    with _kernel_lock:
        if _apply_kernel is None:
            from numba import njit

            @njit(nogil=True)
            def kernel(w: np.ndarray, b: np.ndarray, p: np.ndarray) -> None:  # pragma: no cover - compiled
                d_out, d_in = w.shape
                acc = np.empty(d_in, dtype=np.float64)
                for i in range(d_out):
                    acc[:] = 0.0
                    for t in range(b.shape[1]):
                        bt = b[i, t]
                        for j in range(d_in):
                            acc[j] += bt * p[t, j]  # float64 copies of float32 values: exact products
                    for j in range(d_in):
                        w[i, j] = np.float32(acc[j] + np.float64(w[i, j]))

            _apply_kernel = kernel
        return _apply_kernel


class KrsoMethod(LoraMethod):
    """A full-precision causal LM whose targeted linear weights (``target_modules`` of the
    transformer blocks; ``all-linear``: every linear but the LM head) are trained in random
    subspaces. The trainable state is those weights."""

    name: ClassVar[str] = "krso"

    def __init__(self, model_path: str, adapter: AdapterSpec, *,
                 target_modules: Sequence[str] = (ALL_LINEAR,), backend: str | None = None,
                 workers: int | None = None, **common: Any) -> None:
        """``backend``: how rounds are applied (``apply_terms``: numba or numpy, the same bits); by
        default numpy up to ``zo_directions.NUMPY_MAX_ELEMENTS`` targeted elements. ``workers``:
        threads applying weights side by side (default: torch's threads, at most 4). ``common``:
        LoraMethod's keywords (gradient_checkpointing) and CausalLmMethod's (device, dtype, seed,
        loader). The base must be float32 or bfloat16: W is updated in place."""
        self.target_modules = tuple(target_modules)
        super().__init__(model_path, adapter, **common)
        self.backend = backend or zo_directions.backend_for(self.num_trainable_params())
        if self.backend not in zo_directions.BACKENDS:
            raise ValueError(f"krso backend must be one of {zo_directions.BACKENDS}, got {self.backend!r}")
        self.workers = max(1, workers or min(4, torch.get_num_threads()))
        if self.backend == "numba":
            _kernel()
        self.fingerprint = model_fingerprint(model_path)
        self.last_acc: dict[str, np.ndarray] = {}  # "{seed}/{weight}" -> acc (d_out x r)
        self.last_seeds: list[int] = []
        self._p_cache: dict[tuple[int, int, int], torch.Tensor] = {}

    def _build(self, base: Any) -> tuple[Any, dict[str, torch.nn.Parameter]]:
        model = self._prepare_base(base)
        model_type = str(getattr(model.config, "model_type", "") or "")
        wanted = lora_target_modules(model_type, self.target_modules)
        head = model.get_output_embeddings()
        index: dict[int, int] = {}
        for _, p in model.named_parameters():
            index.setdefault(id(p), len(index))  # tied weights count once, as in zo
        self._targets: list[tuple[str, torch.nn.Linear, int]] = []
        for mname, mod in model.named_modules():
            if not isinstance(mod, torch.nn.Linear) or mod is head:
                continue
            if wanted != ALL_LINEAR and mname.rsplit(".", 1)[-1] not in wanted:
                continue
            self._targets.append((f"{mname}.weight", mod, index[id(mod.weight)]))
        if not self._targets:
            raise ValueError(
                f"krso target_modules {list(self.target_modules)} match no linear layer of {self.model_path}")
        for p in model.parameters():
            p.requires_grad_(False)
        if any(mod.weight.dtype not in (torch.float32, torch.bfloat16) for _, mod, _ in self._targets):
            raise ValueError("krso updates the base weights in place: load it in float32 or bfloat16, not 4-bit")
        model.eval()
        params: dict[str, torch.nn.Parameter] = {name: mod.weight  # type: ignore[misc]  # a Parameter
                                                 for name, mod, _ in self._targets}
        return model, params

    def target_names(self) -> list[str]:
        return [name for name, _, _ in self._targets]

    def _projection(self, seed: int, i: int, rank: int) -> torch.Tensor:
        _, mod, pidx = self._targets[i]
        key = (seed, pidx, rank)
        hit = self._p_cache.get(key)
        if hit is None:
            hit = torch.from_numpy(projection(seed, pidx, rank, mod.in_features))
            self._p_cache[key] = hit
        return hit

    # -- local training -------------------------------------------------------------------------
    def fit(self, examples: Sequence[Example], cfg: FitConfig, *, memory: FitMemory | None = None,
            progress: ProgressFn | None = None, should_stop: StopFn | None = None,
            spec: KrsoSpec | None = None, seeds: Sequence[int] | None = None) -> FitResult:
        """``cfg.local_steps`` steps in intervals of ``spec.interval`` over the round's ``seeds``;
        leaves the accumulators in ``self.last_acc`` and the seeds used in ``self.last_seeds``."""
        if spec is None or not seeds:
            raise ValueError("krso fit needs the federation's KrsoSpec and the round's seeds")
        if not examples:
            raise ValueError("fit needs at least one example")
        plan = memory or NO_PLAN
        guard = plan.guard
        encoded = [self._encode(ex, cfg.max_seq_len) for ex in examples]
        seed_rng = random.Random(f"krso-seeds:{cfg.seed}")
        rank, J = spec.rank, spec.interval
        self._p_cache = {k: v for k, v in self._p_cache.items() if k[0] in set(seeds) and k[2] == rank}
        acc: dict[tuple[int, int], torch.Tensor] = {}
        state: dict[str, Any] = {}

        def hook_for(i: int) -> Any:
            def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
                x = inp[0]
                p, b = state["p"][i], state["b"][i]
                return out + torch.nn.functional.linear(torch.nn.functional.linear(x, p.to(x.dtype)), b.to(x.dtype))
            return hook

        def begin() -> None:
            s = seeds[seed_rng.randrange(len(seeds))]
            state["seed"] = s
            state["p"] = [self._projection(s, i, rank).to(mod.weight.device)
                          for i, (_, mod, _) in enumerate(self._targets)]
            state["b"] = [torch.zeros(mod.out_features, rank, device=mod.weight.device, requires_grad=True)
                          for _, mod, _ in self._targets]
            state["opt"] = torch.optim.Adam(state["b"], lr=cfg.lr, weight_decay=0.0)

        def end() -> None:
            s = state.pop("seed", None)
            if s is None:
                return
            with torch.no_grad():
                for i, (_, mod, _) in enumerate(self._targets):
                    b, p = state["b"][i].detach(), state["p"][i]
                    if mod.weight.dtype == b.dtype:
                        mod.weight.addmm_(b, p)  # in place, no d_out x d_in temporary
                    else:
                        mod.weight.add_((b @ p).to(mod.weight.dtype))
                    key = (s, i)
                    acc[key] = acc[key] + b if key in acc else b.clone()
            state.pop("opt").zero_grad(set_to_none=True)
            state["b"], state["p"] = [], []

        def step(i: int, rows: list[Row]) -> tuple[float, int]:
            if i % J == 0:
                end()
                begin()
            if guard is not None:
                guard.before_step(i + 1)
            opt = state["opt"]
            opt.zero_grad(set_to_none=True)
            lv, n_tok = self._accumulate(rows, i, plan.micro_batch)
            torch.nn.utils.clip_grad_norm_(state["b"], cfg.max_grad_norm)
            opt.step()
            if guard is not None:
                guard.after_step(i + 1)
            return lv, n_tok

        handles = [mod.register_forward_hook(hook_for(i)) for i, (_, mod, _) in enumerate(self._targets)]
        t0 = time.perf_counter()
        self.model.train()
        try:
            with self._rng_guard(cfg.seed):
                losses, tokens = self._train_steps(encoded, cfg, step, progress=progress, should_stop=should_stop)
            end()
        finally:
            for h in handles:
                h.remove()
            self.model.eval()
            state.clear()
            release_memory()
        order = {s: n for n, s in enumerate(seeds)}
        self.last_seeds = sorted({s for s, _ in acc})
        self.last_acc = {tensor_name(s, self._targets[i][0]): acc[(s, i)].cpu().numpy()
                         for s, i in sorted(acc, key=lambda k: (order[k[0]], k[1]))}
        return self._result(examples, losses, tokens, t0)

    # -- the ledger -----------------------------------------------------------------------------
    def check_spec(self, spec: KrsoSpec) -> None:
        if tuple(spec.target_modules) != self.target_modules:
            raise ValueError(f"the federation trains {list(spec.target_modules)}; this model targets "
                             f"{list(self.target_modules)}")
        if spec.base_fingerprint is not None and spec.base_fingerprint != self.fingerprint:
            raise ValueError(f"federation base {spec.base_fingerprint} differs from this device's {self.fingerprint}")

    def apply_round(self, entry: KrsoLedgerRound) -> int:
        """W += sum_s B̄[W][s] P_s for every targeted W (``apply_terms``); returns the terms applied."""
        self.check_spec(entry.spec)
        rank = entry.spec.rank
        seeds = entry.seed_order()  # the round's draw (and, asynchronous, older rounds' draws)
        by_seed = entry.entries(max_elements=len(seeds) * rank * sum(
            mod.out_features for _, mod, _ in self._targets))
        names = {name: i for i, name in enumerate(self.target_names())}
        for per_weight in by_seed.values():
            unknown = sorted(set(per_weight) - set(names))
            if unknown:
                raise ValueError(f"ledger round {entry.round} names {unknown[0]!r}, not a targeted weight here")
            for wname, b in per_weight.items():
                mod = self._targets[names[wname]][1]
                if b.shape != (mod.out_features, rank):
                    raise ValueError(f"ledger round {entry.round}: {wname} has shape {list(b.shape)}, "
                                     f"expected [{mod.out_features}, {rank}]")
        jobs: list[tuple[torch.Tensor, np.ndarray, np.ndarray]] = []
        for i, (name, mod, _) in enumerate(self._targets):
            terms = [(s, ws[name]) for s, ws in by_seed.items() if name in ws]
            if terms:
                b = np.concatenate([bm for _, bm in terms], axis=1)
                p = np.concatenate([self._projection(s, i, rank).numpy() for s, _ in terms], axis=0)
                jobs.append((mod.weight, b, p))

        def run(job: tuple[torch.Tensor, np.ndarray, np.ndarray]) -> None:
            w, b, p = job
            with torch.no_grad():
                if w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous():
                    apply_terms(w.detach().numpy(), b, p, self.backend)
                else:
                    host = w.detach().to("cpu", torch.float32).numpy().copy()
                    apply_terms(host, b, p, self.backend)
                    w.copy_(torch.from_numpy(host).to(w.device, w.dtype))

        # weights are independent: any split over threads gives the same bits
        if self.workers > 1 and self.backend == "numba" and len(jobs) > 1:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="krso") as pool:
                list(pool.map(run, jobs))
        else:
            for job in jobs:
                run(job)
        applied = sum(b.shape[1] // rank for _, b, _ in jobs)
        self._p_cache = {k: v for k, v in self._p_cache.items() if k[0] in set(seeds)}
        return applied

    # -- exact return to the round's start -------------------------------------------------------
    def snapshot(self, path: str | Path) -> None:
        """Write the targeted weights to ``path`` (restored bit for bit by ``restore``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({name: p.detach() for name, p in self._params.items()}, tmp)
        os.replace(tmp, path)

    def restore(self, path: str | Path) -> None:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        with torch.no_grad():
            for name, p in self._params.items():
                p.copy_(state[name])
        del state

    def weights_digest(self) -> str:
        """``fedmq_protocol.modes.krso.weights_digest`` of the targeted weights (no copy on CPU)."""
        return weights_digest((n, p.detach().to("cpu", torch.float32).numpy()) for n, p in self._params.items())

    def load_weights(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Set the targeted weights (a checkpoint): every name and shape must match."""
        self.set_state(arrays)

    def __repr__(self) -> str:
        return (f"KrsoMethod(model={self.model_path!r}, targets={len(self._targets)}, "
                f"trainable={self.num_trainable_params()})")


METHOD = KrsoMethod
