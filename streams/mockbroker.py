"""An in-process Kafka-protocol broker: librdkafka's mock cluster, reached with ctypes.

For the embedded default (``jobstream demo``) only. Limits, measured: topics cannot be created
with CreateTopics (create them here, with :meth:`MockCluster.create_topic`), at most 5 MiB or
100,000 batches are kept per partition (older ones are silently dropped), and transactions
are accepted but not isolated. Never use it in production.

Invariant: the cluster lives as long as this object; ``close()`` destroys it, after which its
bootstrap address refuses connections.
"""

from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path

import confluent_kafka

from streams.errors import StreamsError
from streams.topics import TopicRegistry

_RD_KAFKA_PRODUCER = 0


def _find_librdkafka() -> str:
    pkg = Path(confluent_kafka.__file__).resolve().parent
    candidates = sorted(glob.glob(str(pkg.parent / "confluent_kafka.libs" / "librdkafka*.so*")))
    candidates += sorted(glob.glob(str(pkg / ".dylibs" / "librdkafka*.dylib")))
    if not candidates:
        raise StreamsError("librdkafka was not found inside the confluent-kafka wheel")
    return candidates[0]


class MockCluster:
    """``with MockCluster(brokers=1) as mc: mc.bootstrap`` → ``"127.0.0.1:PORT"``."""

    def __init__(self, brokers: int = 1) -> None:
        lib = ctypes.CDLL(
            _find_librdkafka(), mode=os.RTLD_LOCAL if hasattr(os, "RTLD_LOCAL") else 0
        )
        lib.rd_kafka_conf_new.restype = ctypes.c_void_p
        lib.rd_kafka_conf_set.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.rd_kafka_new.restype = ctypes.c_void_p
        lib.rd_kafka_new.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
        lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
        lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_topic_create.restype = ctypes.c_int
        lib.rd_kafka_mock_topic_create.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
        self._lib = lib
        errstr = ctypes.create_string_buffer(512)
        conf = lib.rd_kafka_conf_new()
        lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, len(errstr))
        self._rk = lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, len(errstr))
        if not self._rk:
            raise StreamsError(f"rd_kafka_new failed: {errstr.value.decode()}")
        self._mc = lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._mc:
            lib.rd_kafka_destroy(self._rk)
            raise StreamsError("rd_kafka_mock_cluster_new failed")
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(self._mc).decode()

    def create_topic(self, name: str, partitions: int, replication: int = 1) -> None:
        err = self._lib.rd_kafka_mock_topic_create(self._mc, name.encode(), partitions, replication)
        if err != 0:
            raise StreamsError(f"mock cluster could not create {name}: error {err}")

    def create_registry_topics(self, registry: TopicRegistry) -> None:
        for name, spec in registry.physical().items():
            self.create_topic(name, spec.partitions, 1)

    def close(self) -> None:
        if self._mc:
            self._lib.rd_kafka_mock_cluster_destroy(self._mc)
            self._mc = None
        if self._rk:
            self._lib.rd_kafka_destroy(self._rk)
            self._rk = None

    def __enter__(self) -> MockCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
