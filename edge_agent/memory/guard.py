"""Runtime memory guard: measure the actual peak of every training step against the budget.

Host memory is the process's peak resident set: on Linux the kernel's high-water mark (``VmHWM``),
reset before each step by writing ``5`` to ``/proc/self/clear_refs``, so a step's peak is exact
however short it lasted; elsewhere (or where the reset is not allowed) a sampling thread reads the
RSS (psutil) every few milliseconds during a step. GPU memory is ``torch.cuda.max_memory_allocated``
(reset per step with ``torch.cuda.reset_peak_memory_stats``); torch is only looked up in
``sys.modules``, so this module is import-safe without torch and without CUDA.

``MemoryGuard.before_step`` refuses to start a step whose predicted peak (the last step's peak plus
what the process grew by since) would exceed the budget; ``after_step`` stops the round when a
step's measured peak did. Both raise ``OverBudget`` carrying the figures; the training loop unwinds
cleanly (its ``finally`` frees optimizer state and activations) and the agent lowers its plan.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from dataclasses import dataclass
from typing import Any

import psutil

from edge_agent.memory.budget import MB, Budget, round_mb

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD_BYTES = 1 << 20


def configure_allocator(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations ≥ ``threshold`` with mmap and hand them back to the OS when freed.

    glibc otherwise raises its mmap threshold dynamically after the first large free, and then
    keeps activation buffers in its heap: the RSS of a training loop creeps up by hundreds of MB
    over the first steps and stays there. Fixing the threshold makes the resident set track the
    memory actually in use, which the budget and the estimate are about. No-op (False) off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False


class OverBudget(RuntimeError):
    """A training step used (or would use) more memory than the budget allows."""

    def __init__(self, *, step: int, peak_host_mb: float | None, peak_gpu_mb: float | None,
                 budget: Budget, predicted: bool = False) -> None:
        self.step = step
        self.peak_host_mb = peak_host_mb
        self.peak_gpu_mb = peak_gpu_mb
        self.budget = budget
        self.predicted = predicted
        parts = []
        if peak_host_mb is not None and budget.host_mb is not None and peak_host_mb > budget.host_mb:
            parts.append(f"host {peak_host_mb:.0f} MiB > budget {budget.host_mb:.0f} MiB")
        if peak_gpu_mb is not None and budget.gpu_mb is not None and peak_gpu_mb > budget.gpu_mb:
            parts.append(f"GPU {peak_gpu_mb:.0f} MiB > budget {budget.gpu_mb:.0f} MiB")
        verb = "would reach" if predicted else "reached"
        super().__init__(f"over budget: step {step} {verb} " + ", ".join(parts or ["the budget"]))

    def figures(self) -> dict[str, Any]:
        return {"step": self.step, "peak_host_mb": round_mb(self.peak_host_mb),
                "peak_gpu_mb": round_mb(self.peak_gpu_mb), "budget_host_mb": round_mb(self.budget.host_mb),
                "budget_gpu_mb": round_mb(self.budget.gpu_mb), "predicted": self.predicted}


def _cuda() -> Any:
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA install must not break CPU training
        return None


class PeakMeter:
    """Peak host RSS and GPU allocation since the last ``reset`` (MiB); keeps the process's
    lifetime peak across resets (``lifetime_host_mb``)."""

    def __init__(self) -> None:
        self._proc = psutil.Process()
        self._hwm_ok = self._can_reset_hwm()
        self._lifetime = 0.0
        self._sampled = 0.0
        self._sampler: threading.Thread | None = None
        self._sampling = threading.Event()
        self._lock = threading.Lock()

    @staticmethod
    def _can_reset_hwm() -> bool:
        if not os.path.exists("/proc/self/clear_refs"):
            return False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return PeakMeter._status_mb("VmHWM") is not None
        except OSError:
            return False

    @staticmethod
    def _status_mb(key: str) -> float | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) / 1024
        except OSError:
            return None
        return None

    @property
    def exact(self) -> bool:
        """True when host peaks are the kernel's high-water mark (not sampled)."""
        return self._hwm_ok

    def rss_mb(self) -> float:
        return self._proc.memory_info().rss / MB

    def host_peak_mb(self) -> float:
        if self._hwm_ok:
            v = self._status_mb("VmHWM")
            if v is not None:
                return max(v, self.rss_mb())
        with self._lock:
            return max(self._sampled, self.rss_mb())

    def gpu_peak_mb(self) -> float | None:
        cuda = _cuda()
        return None if cuda is None else cuda.max_memory_allocated() / MB

    def lifetime_host_mb(self) -> float:
        self._lifetime = max(self._lifetime, self.host_peak_mb())
        return self._lifetime

    def reset(self) -> None:
        self._lifetime = max(self._lifetime, self.host_peak_mb())
        if self._hwm_ok:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                self._hwm_ok = False
        with self._lock:
            self._sampled = self.rss_mb()
        cuda = _cuda()
        if cuda is not None:
            cuda.reset_peak_memory_stats()
        if not self._hwm_ok and self._sampler is None:
            self._sampling.set()
            self._sampler = threading.Thread(target=self._sample, name="memory-sampler", daemon=True)
            self._sampler.start()

    def _sample(self) -> None:
        while self._sampling.wait():
            rss = self.rss_mb()
            with self._lock:
                self._sampled = max(self._sampled, rss)
            threading.Event().wait(0.002)


_METER: PeakMeter | None = None


def meter() -> PeakMeter:
    """The process's meter (one per process: the kernel high-water mark is process-wide)."""
    global _METER
    if _METER is None:
        _METER = PeakMeter()
    return _METER


@dataclass
class StepFigures:
    step: int
    peak_host_mb: float
    peak_gpu_mb: float | None


class MemoryGuard:
    """Measures every step; stops the round (``OverBudget``) before or after a step that exceeds
    ``budget``. With an unbounded budget it only measures (telemetry)."""

    def __init__(self, budget: Budget, *, headroom: float = 1.0) -> None:
        self.budget = budget
        self.headroom = headroom  # predicted peak × headroom must fit (1.0: exactly the budget)
        self.meter = meter()
        self.round_peak_host_mb = 0.0
        self.round_peak_gpu_mb: float | None = None
        self.last: StepFigures | None = None
        self._start_host = self._start_gpu = 0.0  # memory when the current step began
        self._end_host = self._end_gpu = 0.0  # memory when the last step ended

    def start_round(self) -> None:
        self.round_peak_host_mb, self.round_peak_gpu_mb, self.last = 0.0, None, None
        self._end_host = self._end_gpu = 0.0

    def before_step(self, step: int) -> None:
        """Stop before a step whose predicted peak is over: the last step's peak plus whatever the
        process grew by since that step ended (memory that persists across steps adds to the next
        peak; memory a step freed but the allocator kept is reused, so it does not)."""
        host = self.meter.rss_mb()
        cuda = _cuda()
        gpu = cuda.memory_allocated() / MB if cuda is not None else None
        last = self.last
        if self.budget.bounded and last is not None:
            ph = (last.peak_host_mb + max(0.0, host - self._end_host)) * self.headroom
            pg = None
            if gpu is not None and last.peak_gpu_mb is not None:
                pg = (last.peak_gpu_mb + max(0.0, gpu - self._end_gpu)) * self.headroom
            if self._exceeds(ph, pg):
                raise OverBudget(step=step, peak_host_mb=ph, peak_gpu_mb=pg, budget=self.budget, predicted=True)
        self.meter.reset()
        self._start_host, self._start_gpu = host, gpu or 0.0

    def after_step(self, step: int) -> None:
        host = self.meter.host_peak_mb()
        gpu = self.meter.gpu_peak_mb()
        self.last = StepFigures(step, host, gpu)
        self.round_peak_host_mb = max(self.round_peak_host_mb, host)
        if gpu is not None:
            self.round_peak_gpu_mb = max(self.round_peak_gpu_mb or 0.0, gpu)
        self._end_host = self.meter.rss_mb()
        cuda = _cuda()
        self._end_gpu = cuda.memory_allocated() / MB if cuda is not None else 0.0
        if self.budget.bounded and self._exceeds(host, gpu):
            raise OverBudget(step=step, peak_host_mb=host, peak_gpu_mb=gpu, budget=self.budget)

    def _exceeds(self, host: float | None, gpu: float | None) -> bool:
        b = self.budget
        return bool((b.host_mb is not None and host is not None and host > b.host_mb)
                    or (b.gpu_mb is not None and gpu is not None and gpu > b.gpu_mb))
