"""Helpers for tests that use the ``tiny_llama`` and ``synth`` fixtures (defined in conftest.py,
so every test module can ask for them by name)."""

from __future__ import annotations

from pathlib import Path

from edge_agent.data import load_jsonl

# every linear of the tiny Llama: enough capacity for the loss to move within ~20 steps
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def family_examples(synth_dir: Path, family: str, n: int = 64):
    """Up to ``n`` training examples of one family (from whichever device holds it)."""
    out = []
    for f in sorted(synth_dir.glob("device_*.jsonl")):
        out += [e for e in load_jsonl(f) if e.family == family]
    return out[:n]
