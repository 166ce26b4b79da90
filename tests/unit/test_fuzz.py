"""Fuzzing the inputs that come from outside (≥ 10,000 generated inputs in all): every
decoder, the workflow file parser, the telemetry parser and the command template. Each input
is accepted or rejected with a reason; nothing else escapes (no crash, no unexpected
exception type), and hostile strings stay data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.core.command import TemplateError, render_argv
from agents.errors import ConfigError
from agents.ops.cli import load_workflow
from agents.scheduler.telemetry import parse
from streams.errors import InvalidEvent
from streams.events import (
    AnyEvent,
    Control,
    Dispatch,
    JobFailed,
    Submission,
    WorkerHeartbeat,
    decode,
)

HOSTILE = st.sampled_from(
    [
        "'; DROP TABLE jobs; --",
        "$(rm -rf /)",
        "`id`",
        "a\x00b",
        "\ud800",
        "../../etc/passwd",
        "{0.__class__}",
        "%s%s%s",
        "\u202e\u0000",
        "x" * 5000,
    ]
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text() | HOSTILE,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
event_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["job.submitted", "job.failed", "control", "job.dispatch", "worker.heartbeat", "nope"]
        ),
        "v": st.sampled_from([1, 2, "1"]),
    },
    optional={
        "job": st.dictionaries(
            st.sampled_from(["id", "tenant", "kind", "args", "depends_on", "priority", "extra"]),
            json_values,
        ),
        "job_id": json_values,
        "attempt": json_values,
        "action": json_values,
        "scope": json_values,
        "name": json_values,
        "submitted_at": json_values,
    },
)
KINDS = [AnyEvent, Submission, Dispatch, JobFailed, Control, WorkerHeartbeat]


@settings(max_examples=4000, suppress_health_check=[HealthCheck.too_slow])
@given(event_like, st.sampled_from(KINDS))
def test_structured_garbage_is_accepted_or_rejected_with_a_reason(
    doc: object, kind: object
) -> None:
    try:
        raw = json.dumps(doc).encode()
    except (UnicodeEncodeError, ValueError):
        return
    try:
        decode(raw, kind)
    except InvalidEvent as exc:
        assert str(exc)


@settings(max_examples=3000)
@given(st.binary(max_size=3000), st.sampled_from(KINDS))
def test_arbitrary_bytes_are_rejected_with_a_reason(raw: bytes, kind: object) -> None:
    try:
        decode(raw, kind)
    except InvalidEvent as exc:
        assert str(exc)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values)
def test_workflow_files_are_parsed_or_rejected_with_a_reason(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "wf.yaml"
    try:
        path.write_text(json.dumps({"id": "wf", "jobs": doc} if isinstance(doc, list) else doc))
    except (UnicodeEncodeError, ValueError):
        return
    try:
        load_workflow(path, "acme")
    except (InvalidEvent, ConfigError) as exc:
        assert str(exc)


@settings(max_examples=1000)
@given(json_values)
def test_telemetry_is_parsed_or_rejected_with_a_reason(doc: object) -> None:
    try:
        raw = json.dumps(doc).encode()
    except (UnicodeEncodeError, ValueError):
        return
    try:
        parse(raw, 1.0)
    except ValueError as exc:
        assert str(exc)


@settings(max_examples=1000)
@given(
    st.lists(st.text(max_size=20) | HOSTILE, min_size=1, max_size=4),
    st.dictionaries(st.text(max_size=6), json_values, max_size=4),
)
def test_templates_give_one_argv_item_each_or_a_reason(
    template: list[str], args: dict[str, object]
) -> None:
    try:
        argv = render_argv(template, args, {"job_id": "j", "attempt": 1, "tenant": "t"})
    except TemplateError as exc:
        assert str(exc)
        return
    except (ValueError, TypeError) as exc:  # pragma: no cover - would be a bug
        pytest.fail(f"unexpected {type(exc).__name__}: {exc}")
    assert len(argv) == len(template) and all("\x00" not in a for a in argv)
