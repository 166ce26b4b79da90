"""One set of Kafka security settings for both clients: ``kafka_config`` (librdkafka's names,
used as they are by confluent-kafka) mapped to faust's (aiokafka's) credentials.

    kafka_config:
      security.protocol: SASL_SSL          # PLAINTEXT | SSL | SASL_PLAINTEXT | SASL_SSL
      sasl.mechanism: SCRAM-SHA-512        # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512 | GSSAPI
      sasl.username: jobstream
      sasl.password: ...                   # never logged (Settings.redacted)
      ssl.ca.location: /etc/ssl/kafka-ca.pem
      ssl.certificate.location / ssl.key.location / ssl.key.password   # mutual TLS
      enable.ssl.certificate.verification: "false"                     # tests only

A setting the stream agents cannot honour (OAUTHBEARER needs a token callback) is a
start-up error, never a silent plaintext connection.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping
from typing import Any

import faust

from agents.errors import ConfigError


def ssl_context(cfg: Mapping[str, str]) -> ssl.SSLContext:
    try:
        ctx = ssl.create_default_context(cafile=cfg.get("ssl.ca.location") or None)
        cert, key = cfg.get("ssl.certificate.location"), cfg.get("ssl.key.location")
        if cert:
            ctx.load_cert_chain(cert, key or None, password=cfg.get("ssl.key.password") or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"kafka_config SSL files: {exc}") from None
    if str(cfg.get("enable.ssl.certificate.verification", "true")).lower() == "false":
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def faust_credentials(cfg: Mapping[str, str]) -> Any:
    """faust ``broker_credentials`` for ``kafka_config`` (None for plaintext)."""
    protocol = str(cfg.get("security.protocol", "PLAINTEXT")).upper()
    if protocol == "PLAINTEXT":
        return None
    if protocol == "SSL":
        return faust.SSLCredentials(ssl_context(cfg))
    if protocol not in ("SASL_PLAINTEXT", "SASL_SSL"):
        raise ConfigError(f"kafka_config security.protocol {protocol!r} is not supported")
    context = ssl_context(cfg) if protocol == "SASL_SSL" else None
    mechanism = str(cfg.get("sasl.mechanism") or cfg.get("sasl.mechanisms") or "PLAIN").upper()
    if mechanism == "GSSAPI":
        return faust.GSSAPICredentials(
            kerberos_service_name=cfg.get("sasl.kerberos.service.name", "kafka"),
            ssl_context=context,
        )
    if mechanism not in ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"):
        raise ConfigError(
            f"kafka_config sasl.mechanism {mechanism!r} is not supported by the stream agents"
        )
    if not cfg.get("sasl.username") or not cfg.get("sasl.password"):
        raise ConfigError("kafka_config: SASL needs sasl.username and sasl.password")
    return faust.SASLCredentials(
        username=cfg["sasl.username"],
        password=cfg["sasl.password"],
        ssl_context=context,
        mechanism=mechanism,
    )
