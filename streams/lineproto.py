"""InfluxDB line protocol, encoded exactly (what Telegraf's listeners and InfluxDB 1.x parse).

    measurement,tag=value,tag2=value2 field=1i,other="text" 1700000000000000000

Rules (checked against InfluxDB 1.6's parser by ``tests/integration/test_metrics.py``):
- measurement: ``,`` and space are escaped; tag keys, tag values and field keys: ``,``, ``=``
  and space. A backslash is kept as it is (the parser keeps ``\\x``), except at the end of a
  name or value, where no line protocol can carry it: a trailing backslash is followed by an
  escaped space there (``a\\`` → ``a\\ ``: stored as ``a\\ ``, never a parse error that drops
  the whole batch). Newlines and carriage returns in names are written as ``\\n``/``\\r``.
- Tags are sorted by key (what InfluxDB wants for speed); empty tag values are left out.
- String fields are double-quoted with ``\\`` and ``"`` escaped; integers get ``i``; bools are
  ``true``/``false``; NaN and infinities are dropped (line protocol has no spelling for them).
- A point without fields is not a point: :func:`encode` returns None for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

FieldValue = int | float | bool | str
_NAME = str.maketrans({"\n": "\\n", "\r": "\\r"})


def _esc(text: str, specials: str) -> str:
    out = text.translate(_NAME)
    if "\\" in out or any(c in out for c in specials):
        out = "".join("\\" + c if c in specials else c for c in out)
    if out.endswith("\\") and not out.endswith("\\ "):
        out += "\\ "
    return out


def measurement(name: str) -> str:
    return _esc(name, ", ")


def key(name: str) -> str:
    return _esc(name, ",= ")


def field_value(value: FieldValue) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value}i"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else None
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def encode(
    name: str,
    tags: Mapping[str, str],
    fields: Mapping[str, FieldValue],
    ts_ns: int | None = None,
) -> str | None:
    """One line (without the newline), or None when no field is representable."""
    parts = []
    for k, v in fields.items():
        text = field_value(v)
        if text is not None:
            parts.append(f"{key(k)}={text}")
    if not parts:
        return None
    head = measurement(name)
    for k in sorted(tags):
        v = tags[k]
        if v:
            head += f",{key(k)}={key(v)}"
    line = f"{head} {','.join(parts)}"
    return line if ts_ns is None else f"{line} {ts_ns}"


def batches(lines: Iterable[str], max_bytes: int) -> Iterable[bytes]:
    """Newline-joined payloads of at most ``max_bytes`` each (a longer line goes alone)."""
    buf: list[bytes] = []
    size = 0
    for line in lines:
        data = line.encode()
        if buf and size + len(data) + 1 > max_bytes:
            yield b"\n".join(buf) + b"\n"
            buf, size = [], 0
        buf.append(data)
        size += len(data) + 1
    if buf:
        yield b"\n".join(buf) + b"\n"
