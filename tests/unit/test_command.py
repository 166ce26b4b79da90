"""argv templates: one item per template item, no shell, no format-spec tricks."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agents.core.command import TemplateError, render_argv

B = {"job_id": "j1", "attempt": 2, "tenant": "acme"}


def test_placeholders_and_builtins() -> None:
    argv = render_argv(
        ["nomos", "--upload={upload}", "{job_id}.{attempt}", "{{literal}}"], {"upload": 42}, B
    )
    assert argv == ["nomos", "--upload=42", "j1.2", "{literal}"]


def test_missing_argument_names_it() -> None:
    with pytest.raises(TemplateError, match="'file'"):
        render_argv(["cat", "{file}"], {}, B)


def test_format_spec_and_attribute_access_are_not_interpreted() -> None:
    argv = render_argv(["{x.__class__}", "{0}", "{x!r}", "{x:>10}"], {"x": "v"}, B)
    assert argv == ["{x.__class__}", "{0}", "{x!r}", "{x:>10}"]


def test_structured_values_become_json() -> None:
    assert render_argv(["{v}"], {"v": {"a": [1, True]}}, B) == ['{"a":[1,true]}']


@given(st.text().filter(lambda s: "\x00" not in s))
def test_any_value_stays_exactly_one_argv_item(value: str) -> None:
    assert render_argv(["prog", "{v}"], {"v": value}, B) == ["prog", value]
