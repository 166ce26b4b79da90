"""Exceptions of the ``streams`` package.

One base class; each subclass carries a default message so ``raise KafkaUnavailable()`` reads
well. Driver exceptions (``confluent_kafka.KafkaException``) are translated at the adapter
boundary and never escape raw.
"""

from __future__ import annotations


class StreamsError(Exception):
    """Base class of every error raised by ``streams``."""

    message = "stream error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)


class InvalidEvent(StreamsError):
    """An event could not be decoded or failed validation; ``str(exc)`` is the reason."""

    message = "invalid event"


class DeliveryFailed(StreamsError):
    """The broker did not confirm a produced message."""

    message = "the broker did not confirm delivery"


class KafkaUnavailable(StreamsError):
    """The broker could not be reached in time."""

    message = "Kafka is not reachable"


class TopicConfigError(StreamsError):
    """``topics.yaml`` is malformed or disagrees with the cluster."""

    message = "topic configuration error"
