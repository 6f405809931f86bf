"""fedmq wire protocol: topics, messages, tensor codec and chunking.

Pure Python + numpy + msgpack. Nothing here imports paho (see ``fedmq_protocol.transport``)
or torch, so the coordinator can depend on it without an ML stack.
"""

SCHEMA_VERSION = 1

from fedmq_protocol.errors import ProtocolError  # noqa: E402

__all__ = ["SCHEMA_VERSION", "ProtocolError"]
