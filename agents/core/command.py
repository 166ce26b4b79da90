"""Turning a kind's argv template and a job's args into an argv list, without a command interpreter.

Invariants:
- Each template item becomes exactly one argv item; placeholders ``{name}`` are replaced by
  the string form of ``args[name]`` (or the built-ins ``job_id``, ``attempt``, ``tenant``).
  No attribute access, indexing or format specs (``{0.__class__}``) are interpreted, and the
  result never passes through a command interpreter, so hostile values stay inert data.
- A missing argument is an error naming it; ``{{`` and ``}}`` are literal braces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")


BUILTINS = frozenset({"job_id", "attempt", "tenant"})


class TemplateError(ValueError):
    pass


@lru_cache(maxsize=256)
def needed(template: tuple[str, ...]) -> tuple[str, ...]:
    """The names a job's args must hold for ``template`` (its placeholders but the
    built-ins), sorted: checked when a job is submitted, not when its worker runs it."""
    names = {m.group(1) for item in template for m in _PLACEHOLDER.finditer(item)}
    return tuple(sorted(n for n in names if n and n not in BUILTINS))


def missing_args(template: Sequence[str] | None, args: Mapping[str, Any]) -> tuple[str, ...]:
    """The names ``template`` needs that ``args`` lacks (none for an entrypoint kind)."""
    return tuple(n for n in needed(tuple(template)) if n not in args) if template else ()


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def render_argv(
    template: Sequence[str], args: Mapping[str, Any], builtins: Mapping[str, Any]
) -> list[str]:
    values = {**args, **builtins}
    out: list[str] = []
    for item in template:

        def sub(m: re.Match[str]) -> str:
            tok = m.group(0)
            if tok == "{{":
                return "{"
            if tok == "}}":
                return "}"
            name = m.group(1)
            if name not in values:
                raise TemplateError(f"the command needs the argument {name!r}")
            return _text(values[name])

        rendered = _PLACEHOLDER.sub(sub, item)
        if "\x00" in rendered:
            raise TemplateError("an argument contains a NUL character")
        out.append(rendered)
    return out
