"""What flows: event types and their codec, the topic registry, Kafka adapters and the
publishing API. Importable without faust, so any upstream service can publish jobs."""

from streams.errors import DeliveryFailed, InvalidEvent, KafkaUnavailable, StreamsError
from streams.events import JobSpec, JobSubmitted, decode, encode
from streams.publisher import JobPublisher

__all__ = [
    "DeliveryFailed",
    "InvalidEvent",
    "JobPublisher",
    "JobSpec",
    "JobSubmitted",
    "KafkaUnavailable",
    "StreamsError",
    "decode",
    "encode",
]
