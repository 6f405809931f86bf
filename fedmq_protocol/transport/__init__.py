"""MQTT transport: the only part of fedmq_protocol that imports paho."""

from fedmq_protocol.transport.config import BrokerConfig, parse_broker_url
from fedmq_protocol.transport.mqtt import MqttTransport, Subscription, TransportError, WillMessage

__all__ = ["BrokerConfig", "MqttTransport", "Subscription", "TransportError", "WillMessage", "parse_broker_url"]
