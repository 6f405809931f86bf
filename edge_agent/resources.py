"""What a device has: CPU, RAM, and GPU memory when CUDA is present."""

from __future__ import annotations

import os
import sys

import psutil

from fedmq_protocol.messages import GpuInfo, Resources

_MB = 1024 * 1024


def gpu_info() -> tuple[GpuInfo, ...]:
    # Only look if torch is already loaded: telemetry must not pull in CUDA on its own.
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return ()
    out = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        out.append(GpuInfo(name=torch.cuda.get_device_name(i), total_mb=total / _MB, free_mb=free / _MB))
    return tuple(out)


def snapshot() -> Resources:
    vm = psutil.virtual_memory()
    return Resources(
        cpu_count=os.cpu_count() or 1,
        cpu_percent=psutil.cpu_percent(interval=None),
        ram_total_mb=round(vm.total / _MB, 1),
        ram_available_mb=round(vm.available / _MB, 1),
        process_rss_mb=round(psutil.Process().memory_info().rss / _MB, 1),
        gpus=gpu_info(),
    )
