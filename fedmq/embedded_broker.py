"""An in-process MQTT broker (amqtt) for the demo when no broker is given.

Bound to 127.0.0.1 only, anonymous, in memory, MQTT 3.1.1: fine for a demo on one machine,
not for a fleet (use Mosquitto or EMQX there; see configs/mosquitto/).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EmbeddedBroker:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._broker = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 15.0) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise RuntimeError("the embedded demo broker needs amqtt: pip install 'fedmq[demo]'") from exc
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            try:
                broker = self._broker = Broker(config, loop=self._loop)
                self._loop.run_until_complete(broker.start())
            except BaseException as exc:  # noqa: BLE001 - surfaced to the caller of start()
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError(f"embedded broker did not start on {self.url} within {timeout:.0f}s")
        if self._error:
            raise RuntimeError(f"embedded broker failed on {self.url}: {self._error}")
        return self

    def stop(self) -> None:
        if self._loop is None or self._broker is None:
            return
        fut = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        with contextlib.suppress(Exception):  # shutdown is best effort; the loop is stopped either way
            fut.result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread:
            self._thread.join(timeout=5)
