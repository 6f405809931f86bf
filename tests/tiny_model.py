"""Helpers for tests that need a model: a session-wide tiny-llama and synthetic data.

Import the fixtures into a test module (``from tests.tiny_model import tiny_llama, synth``)
to use them there.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.data import load_jsonl, synthesize

# every linear of the tiny Llama: enough capacity for the loss to move within ~20 steps
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Path of a tiny random Llama checkpoint (built once per session in a private cache)."""
    from edge_agent.models import resolve_model

    home = tmp_path_factory.mktemp("fedmq-home")
    return resolve_model("tiny-llama", cache_dir=home, log=lambda _msg: None)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A synthetic data set: 3 devices × 120 samples, 70 eval samples, seed 0."""
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_devices=3, samples_per_device=120, eval_samples=70, seed=0)
    return out


def family_examples(synth_dir: Path, family: str, n: int = 64):
    """Up to ``n`` training examples of one family (from whichever device holds it)."""
    out = []
    for f in sorted(synth_dir.glob("device_*.jsonl")):
        out += [e for e in load_jsonl(f) if e.family == family]
    return out[:n]
