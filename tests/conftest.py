"""Shared fixtures: real Mosquitto brokers.

``mosquitto`` is a factory: ``broker = mosquitto(message_size_limit=65536, users={"u": "p"},
acl="...", tls=True, max_queued_messages=100)`` returns a started
:class:`tests.mosquitto.MosquittoBroker` (``host``, ``port``, ``url``, ``restart()``, ``stop()``,
``log_path``, ``tls_files``); every broker is killed at teardown. ``mqtt_broker`` is one broker
with defaults (anonymous, no limits). Tests using them are skipped when mosquitto is missing.

``tiny_llama`` and ``synth`` are a session-wide tiny random Llama checkpoint and synthetic data
set (helpers for them: :mod:`tests.tiny_model`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mosquitto import MosquittoBroker, find_mosquitto

_SKIP_REASON = "mosquitto is not installed (apt-get install mosquitto mosquitto-clients)"


@pytest.fixture
def mosquitto(tmp_path_factory):
    exe = find_mosquitto()
    if exe is None:
        pytest.skip(_SKIP_REASON)
    brokers: list[MosquittoBroker] = []

    def factory(**options) -> MosquittoBroker:
        if options.get("tls"):
            pytest.importorskip("cryptography", reason="TLS tests need the 'cryptography' package")
        broker = MosquittoBroker(tmp_path_factory.mktemp("mosquitto"), exe=exe, **options)
        brokers.append(broker)
        return broker.start()

    yield factory
    for broker in brokers:
        broker.stop()


@pytest.fixture
def mqtt_broker(mosquitto) -> MosquittoBroker:
    return mosquitto()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """Path of a tiny random Llama checkpoint (built once per session in a private cache)."""
    from edge_agent.models import resolve_model

    home = tmp_path_factory.mktemp("fedmq-home")
    return resolve_model("tiny-llama", cache_dir=home, log=lambda _msg: None)


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    """A synthetic data set: 3 devices × 120 samples, 70 eval samples, seed 0."""
    from edge_agent.data import synthesize

    out = tmp_path_factory.mktemp("synth")
    synthesize(out, num_devices=3, samples_per_device=120, eval_samples=70, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory):
    """``tiny_family("tiny-qwen2")``: the path of a tiny random checkpoint of that family
    (tiny-llama, tiny-qwen2, tiny-gemma, tiny-phi3), built once per session."""
    from edge_agent.models import resolve_model

    home = tmp_path_factory.mktemp("fedmq-families")
    return lambda name: resolve_model(name, cache_dir=home, log=lambda _msg: None)
