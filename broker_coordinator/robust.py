"""Robust aggregation of adapter differences: update-norm clipping and coordinate-wise
trimmed mean or median (coordinator YAML ``aggregation``).

``fedavg`` (default) is the sample-weighted mean (``strategy.mean_delta``). ``trimmed_mean`` drops,
for every coordinate, the ``floor(trim_fraction * n)`` largest and smallest of the n values and
averages the rest; ``median`` takes the coordinate-wise median. Both are unweighted: a device's
self-reported ``num_samples`` cannot buy it more influence. Clipping (any rule) first scales every
update whose L2 norm (over the whole adapter) exceeds the bound down to it; the bound is
``clip_norm``, or ``clip_median_factor`` x the median norm of the round's updates, or the smaller
of the two when both are set. A device that sends a scaled (x100) or sign-flipped update moves the
trimmed mean / median of n >= 3 devices by at most the spread of the honest ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedmq_protocol.codec import DecodedTensor

# coordinates processed at a time: n updates x CHUNK float32 values are held at once
CHUNK_ELEMENTS = 1 << 18


class AggregationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Literal["fedavg", "trimmed_mean", "median"] = "fedavg"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed_mean: share cut at each end")
    clip_norm: float | None = Field(None, gt=0, description="clip each update's L2 norm to this")
    clip_median_factor: float | None = Field(
        None, gt=0, description="clip each update's L2 norm to this many times the round's median norm")

    @model_validator(mode="after")
    def _finite(self) -> AggregationConfig:
        for name in ("clip_norm", "clip_median_factor"):
            v = getattr(self, name)
            if v is not None and not math.isfinite(v):
                raise ValueError(f"aggregation.{name} must be finite")
        return self

    @property
    def is_plain(self) -> bool:
        return self.rule == "fedavg" and self.clip_norm is None and self.clip_median_factor is None

    @property
    def nonlinear_reason(self) -> str | None:
        """Why the rule is not a (clipped) sample-weighted sum of the updates, so cannot be folded
        update by update or pre-aggregated by a site (None: it can)."""
        if self.rule != "fedavg":
            return f"rule {self.rule} needs every update of the round at once"
        if self.clip_median_factor is not None:
            return "clip_median_factor clips to the round's median norm, known only once every update is in"
        return None


def update_norm(decoded: Mapping[str, DecodedTensor]) -> float:
    return math.sqrt(sum(float(np.dot(t.values.astype(np.float64), t.values.astype(np.float64)))
                         for t in decoded.values()))


def clip_scales(norms: Sequence[float], cfg: AggregationConfig) -> list[float]:
    """Per-update factor (<= 1) that brings each norm under the configured bound."""
    bound = math.inf
    if cfg.clip_norm is not None:
        bound = cfg.clip_norm
    if cfg.clip_median_factor is not None and norms:
        bound = min(bound, cfg.clip_median_factor * float(np.median(norms)))
    return [1.0 if n <= bound or n == 0 else bound / n for n in norms]


def robust_delta(
    global_tensors: Mapping[str, np.ndarray],
    num_samples: Sequence[int],
    decoded: Sequence[Mapping[str, DecodedTensor]],
    cfg: AggregationConfig,
) -> dict[str, np.ndarray]:
    """The aggregated difference (float64) of ``decoded`` updates under ``cfg``."""
    n = len(decoded)
    if n == 0:
        raise ValueError("aggregation needs at least one update")
    scales = clip_scales([update_norm(d) for d in decoded], cfg)
    out: dict[str, np.ndarray] = {}
    if cfg.rule == "fedavg":
        total = float(sum(num_samples))
        if total <= 0:
            raise ValueError("updates report zero samples in total")
        for name, base in global_tensors.items():
            acc = np.zeros(base.size, dtype=np.float64)
            for w, s, d in zip(num_samples, scales, decoded, strict=True):
                d[name].add_into(acc, s * w / total)
            out[name] = acc.reshape(base.shape)
        return out
    k = math.floor(cfg.trim_fraction * n) if cfg.rule == "trimmed_mean" else 0
    for name, base in global_tensors.items():
        numel = base.size
        acc = np.empty(numel, dtype=np.float64)
        for lo in range(0, numel, CHUNK_ELEMENTS):
            hi = min(numel, lo + CHUNK_ELEMENTS)
            stack = np.zeros((n, hi - lo), dtype=np.float64)
            for i, d in enumerate(decoded):
                _fill(stack[i], d[name], lo, hi, scales[i])
            if cfg.rule == "median":
                acc[lo:hi] = np.median(stack, axis=0)
            else:
                stack.sort(axis=0)
                acc[lo:hi] = stack[k:n - k].mean(axis=0)
        out[name] = acc.reshape(base.shape)
    return out


def _fill(row: np.ndarray, t: DecodedTensor, lo: int, hi: int, scale: float) -> None:
    """``row = scale * t[lo:hi]`` (flat coordinates; sparse tensors are zero elsewhere)."""
    if t.indices is None:
        row[:] = t.values[lo:hi]
    else:
        a, b = np.searchsorted(t.indices, [lo, hi])
        row[t.indices[a:b] - lo] = t.values[a:b]
    if scale != 1.0:
        row *= scale
