"""The publisher stage (DESIGN §6, §7): topic tree, payloads and their JSON Schemas, the MQTT
client. Torch-free; paho-mqtt is a base dependency."""

from edge_stn.publish.client import (
    MqttPublisher,
    PublishedResult,
    PublisherCounters,
    PublisherLimits,
)
from edge_stn.publish.payloads import DeviceInfo, ModelInfo, encode, load_schema
from edge_stn.publish.topics import TopicTree, parse_topic, subscription

__all__ = [
    "DeviceInfo",
    "ModelInfo",
    "MqttPublisher",
    "PublishedResult",
    "PublisherCounters",
    "PublisherLimits",
    "TopicTree",
    "encode",
    "load_schema",
    "parse_topic",
    "subscription",
]
