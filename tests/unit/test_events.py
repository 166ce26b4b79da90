"""The event codec: round trips, and every kind of bad input rejected with a reason."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.errors import InvalidEvent
from streams.events import (
    AnyEvent,
    Dispatch,
    JobFailed,
    JobSpec,
    JobSubmitted,
    WorkerHeartbeat,
    decode,
    encode,
    event_type,
    submission_schema,
)

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "streams/schema/job-submitted.v1.json"


def submitted(**job: object) -> bytes:
    base: dict[str, object] = {"id": "j1", "tenant": "acme", "kind": "noop"}
    base.update(job)
    return json.dumps({"type": "job.submitted", "v": 1, "job": base, "submitted_at": 1.5}).encode()


def test_round_trip_of_every_event_type() -> None:
    events: list[AnyEvent] = [
        JobSubmitted(
            job=JobSpec(
                id="a",
                tenant="t",
                kind="k",
                args={"x": [1, {"y": None}]},
                priority=-20,
                size=10,
                depends_on=["b"],
                group="g",
            ),
            submitted_at=1.0,
        ),
        Dispatch(
            job_id="a",
            attempt=1,
            tenant="t",
            kind="k",
            args={},
            timeout_s=None,
            submitted_at=1.0,
            dispatched_at=2.0,
        ),
        JobFailed(job_id="a", attempt=2, worker="w", at=3.0, error="boom", retryable=False),
        WorkerHeartbeat(worker="w", host="h", slots_total=4, slots_free=1, running=["a"], at=4.0),
    ]
    for ev in events:
        assert decode(encode(ev)) == ev
        # the tag alone, as the dependency agent reads it to hold starts
        assert event_type(encode(ev)) == type(ev).__struct_config__.tag


@pytest.mark.parametrize("raw", [None, b"", b"{", b"[1]", b'{"v": 1}', b'{"type": 3}', b"\xff"])
def test_the_tag_of_something_not_an_event_is_none(raw: bytes | None) -> None:
    assert event_type(raw) is None


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"", "malformed JSON"),
        (None, "empty message"),
        (b"{", "malformed JSON"),
        (b"\xff\xfe\x00", "malformed JSON"),
        (b"[]", "Expected `object`"),
        (b'{"type":"job.nope","v":1}', "Invalid value 'job.nope'"),
        (submitted(priority="high"), "Expected `int`, got `str` - at `$.job.priority`"),
        (submitted(priority=21), "Expected `int` <= 20"),
        (submitted(size=-1), "Expected `int` >= 0"),
        (submitted(id=""), "Expected `str` of length >= 1"),
        (submitted(id="has space"), "matching regex"),
        (submitted(tenant="a\u0000b"), "matching regex"),
        (submitted(args={"k": "nul\u0000inside"}), "NUL character"),
        (submitted(args="not-an-object"), "Expected `object`"),
        (submitted(depends_on=["j1"]), "depends on itself"),
        (submitted(surprise=1), "unknown field `surprise`"),
        (submitted(timeout_s=0), "Expected `float` > 0.0"),
        (submitted(kind="Robert'); DROP TABLE jobs;--"), "matching regex"),
        (
            json.dumps(
                {
                    "type": "job.submitted",
                    "v": 2,
                    "job": {"id": "a", "tenant": "t", "kind": "k"},
                    "submitted_at": 1,
                }
            ).encode(),
            "unsupported schema version 2",
        ),
    ],
)
def test_bad_input_is_rejected_with_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as exc:
        decode(raw, JobSubmitted)
    assert reason in str(exc.value)


def test_oversized_payload_is_rejected_before_parsing() -> None:
    raw = submitted(args={"blob": "x" * 5000})
    with pytest.raises(InvalidEvent, match="over the limit of 1024 bytes"):
        decode(raw, JobSubmitted, max_bytes=1024)


def test_deeply_nested_args_are_rejected() -> None:
    deep: object = "leaf"
    for _ in range(40):
        deep = {"d": deep}
    with pytest.raises(InvalidEvent, match="nested deeper"):
        decode(submitted(args={"x": deep}), JobSubmitted)


def test_pathologically_nested_json_is_rejected_not_crashing() -> None:
    with pytest.raises(InvalidEvent):
        decode(b"[" * 200_000 + b"]" * 200_000, JobSubmitted, max_bytes=10**6)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_raise_anything_but_invalid_event(raw: bytes) -> None:
    try:
        decode(raw)
    except InvalidEvent:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "id",
                "tenant",
                "kind",
                "args",
                "priority",
                "size",
                "depends_on",
                "group",
                "labels",
                "extra",
            ]
        ),
        json_values,
    )
)
def test_arbitrary_json_jobs_decode_or_are_rejected(job: dict[str, object]) -> None:
    raw = json.dumps({"type": "job.submitted", "v": 1, "job": job, "submitted_at": 1})
    try:
        ev = decode(raw.encode(), JobSubmitted)
    except InvalidEvent:
        return
    assert isinstance(ev, JobSubmitted)
    assert "\x00" not in json.dumps(ev.job.args)


def test_published_json_schema_is_current() -> None:
    on_disk = json.loads(SCHEMA_FILE.read_text())
    assert on_disk == submission_schema(), "run `make schema` and commit the result"


def test_schema_rejects_unknown_fields_as_the_decoder_does() -> None:
    spec = submission_schema()["$defs"]["JobSpec"]
    assert spec["additionalProperties"] is False
    assert set(spec["required"]) == {"id", "tenant", "kind"}
    assert msgspec.json.decode(submitted()) is not None
