"""Exceptions of the ``agents`` package: one base, a default message per subclass."""

from __future__ import annotations


class JobstreamError(Exception):
    message = "jobstream error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.message)


class ConfigError(JobstreamError):
    message = "invalid configuration"


class StoreUnavailable(JobstreamError):
    message = "PostgreSQL is not reachable"


class UnknownJob(JobstreamError):
    message = "no such job"
