"""A misbehaving device for tests: ``python -m tests.faulty_agent --update-scale S agent --config X``
runs ``fedmq agent`` whose adapter-mode fit updates are S times the real difference (100: scaled,
-1: sign-flipped), as an attacker or a broken device would send them (tests/test_robust_aggregation.py)."""

from __future__ import annotations

import argparse
import logging
from dataclasses import replace
from typing import Any

import numpy as np

import edge_agent.modes.adapter as adapter_mode
from edge_agent.modes import UpdateContent

log = logging.getLogger("fedmq.agent")


class ScaledUpdates(adapter_mode.AdapterMode):
    """The adapter mode, with every fit update multiplied by ``scale`` before it is encoded."""

    scale = 1.0

    def update_content(self, task: Any, trainer: Any, result: Any) -> UpdateContent:
        content = super().update_content(task, trainer, result)
        log.warning("FAULT INJECTION: update of %s scaled by %s", task.task_id, self.scale)
        arrays = {k: v * np.float32(self.scale) for k, v in (content.arrays or {}).items()}
        return replace(content, arrays=arrays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faulty_agent")
    parser.add_argument("--update-scale", type=float, required=True)
    args, rest = parser.parse_known_args(argv)
    ScaledUpdates.scale = args.update_scale
    adapter_mode.MODE = ScaledUpdates  # what edge_agent.modes.mode_class("adapter") finds
    from fedmq.cli import main as fedmq_main

    return fedmq_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
