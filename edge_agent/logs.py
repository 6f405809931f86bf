"""Keep a healthy agent's log free of the ML libraries' noise.

Call ``quiet_libraries()`` before torch, transformers, peft or bitsandbytes are imported (the agent
does it when it is built); it imports none of them.
"""

from __future__ import annotations

import logging
import os
import sys

# bitsandbytes >= 0.50 on a CPU with AVX512-BF16 tries the optional ``kernels`` package (a faster
# NF4 matmul downloaded from the Hugging Face hub) when it is imported, and logs a WARNING when that
# package is absent. bitsandbytes then uses its own CPU kernel, so nothing is wrong; peft imports
# bitsandbytes whenever it is installed, so the warning appeared on every CPU agent, LoRA included.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_MESSAGE = "Failed to load CPU gemm_4bit_forward"


class _DropMissingKernels(logging.Filter):
    """Drops bitsandbytes' warning about the missing optional ``kernels`` package, nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(BNB_KERNELS_MESSAGE):
            return True
        return "No module named 'kernels'" not in record.getMessage()


_FILTER = _DropMissingKernels()


def quiet_libraries(stream: object | None = None) -> None:
    """Silence bitsandbytes' harmless missing-``kernels`` warning; no progress bars unless ``stream``
    (default stderr) is a terminal: in a log file a bar is a line of carriage returns."""
    bnb = logging.getLogger(BNB_CPU_LOGGER)
    if _FILTER not in bnb.filters:
        bnb.addFilter(_FILTER)
    out = sys.stderr if stream is None else stream
    isatty = getattr(out, "isatty", None)
    if not (callable(isatty) and isatty()):
        # read by huggingface_hub, and by transformers when it is imported (its tqdm wrapper)
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # imported already: the variable came too late
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
