"""MQTT transport: the only part of fedmq_protocol that imports paho.

``MqttTransport`` (channel.py) is the framed channel the rest of fedmq uses: chunking,
reassembly, retained-chunk bookkeeping. It composes an ``MqttClient`` (client.py): one
connection, subscriptions that survive reconnects, one ``Future`` per unacknowledged message
(acks.py); the paho client's setup and first connect are in connection.py. ``TransportError``
lives in errors.py, ``BrokerConfig`` in config.py.
"""

from fedmq_protocol.transport.channel import MqttTransport, Published, Subscription
from fedmq_protocol.transport.client import MqttClient
from fedmq_protocol.transport.config import BrokerConfig, parse_broker_url
from fedmq_protocol.transport.connection import WillMessage
from fedmq_protocol.transport.errors import TransportError

__all__ = [
    "BrokerConfig",
    "MqttClient",
    "MqttTransport",
    "Published",
    "Subscription",
    "TransportError",
    "WillMessage",
    "parse_broker_url",
]
