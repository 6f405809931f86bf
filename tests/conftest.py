"""Shared fixtures: real Mosquitto brokers.

``mosquitto`` is a factory: ``broker = mosquitto(message_size_limit=65536, users={"u": "p"},
acl="...", tls=True, max_queued_messages=100)`` returns a started
:class:`tests.mosquitto.MosquittoBroker` (``host``, ``port``, ``url``, ``restart()``, ``stop()``,
``log_path``, ``tls_files``); every broker is killed at teardown. ``mqtt_broker`` is one broker
with defaults (anonymous, no limits). Tests using them are skipped when mosquitto is missing.
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
