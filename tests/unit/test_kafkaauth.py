"""Kafka security settings reach both clients: librdkafka names → faust credentials."""

from __future__ import annotations

import faust
import pytest

from agents.errors import ConfigError
from agents.kafkaauth import faust_credentials
from agents.settings import load_settings


def test_plaintext_needs_no_credentials() -> None:
    assert faust_credentials({}) is None


def test_sasl_scram_over_tls_maps_every_field() -> None:
    creds = faust_credentials(
        {
            "security.protocol": "SASL_SSL",
            "sasl.mechanism": "SCRAM-SHA-512",
            "sasl.username": "js",
            "sasl.password": "pw",
        }
    )
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password) == ("js", "pw")
    assert str(creds.mechanism.value) == "SCRAM-SHA-512"
    assert creds.ssl_context is not None and str(creds.protocol.value) == "SASL_SSL"


def test_plain_tls_and_unsupported_settings() -> None:
    tls = faust_credentials({"security.protocol": "SSL"})
    assert isinstance(tls, faust.SSLCredentials)
    with pytest.raises(ConfigError, match="OAUTHBEARER"):
        faust_credentials({"security.protocol": "SASL_SSL", "sasl.mechanism": "OAUTHBEARER"})
    with pytest.raises(ConfigError, match="sasl.username"):
        faust_credentials({"security.protocol": "SASL_PLAINTEXT"})
    with pytest.raises(ConfigError, match="SSL files"):
        faust_credentials({"security.protocol": "SSL", "ssl.ca.location": "/nonexistent.pem"})


def test_secrets_are_redacted() -> None:
    s = load_settings(
        {},
        kafka_config={"sasl.password": "hunter2", "sasl.username": "js"},
        database_url="postgresql://u:dbsecret@h/db",
        status_token="tok",
    )
    text = repr(s.redacted())
    assert "hunter2" not in text and "dbsecret" not in text and "'tok'" not in text
