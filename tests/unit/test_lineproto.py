"""The line protocol encoder and the metrics sender's failure behaviour (real sockets)."""

from __future__ import annotations

import math
import socket
import time

from hypothesis import given
from hypothesis import strategies as st

from agents.metrics import Metrics
from streams.lineproto import batches, encode


def test_escaping_rules() -> None:
    line = encode(
        "m x,y", {"b": "v 1,2=3", "a": "back\\slash", "empty": ""}, {"s": 'q"\\', "i": 3}, 7
    )
    assert line == 'm\\ x\\,y,a=back\\slash,b=v\\ 1\\,2\\=3 s="q\\"\\\\",i=3i 7'
    assert encode("m", {"t": "end\\"}, {"f": 1.5}) == "m,t=end\\\\  f=1.5"
    assert encode("m", {}, {"nan": math.nan, "inf": math.inf}) is None
    assert encode("m", {"t": "a\nb"}, {"b": True}) == "m,t=a\\nb b=true"


@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=50), st.integers(40, 400))
def test_batches_keep_every_line_once_and_respect_the_size(lines: list[str], size: int) -> None:
    clean = [x.replace("\n", " ") for x in lines]
    out = list(batches(clean, size))
    assert b"".join(out).decode().split("\n")[:-1] == clean
    for b in out:
        assert len(b) <= size or b.count(b"\n") == 1  # only a single long line may exceed


def test_a_missing_telegraf_never_blocks_or_raises() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connections are refused
        http = Metrics(f"http://127.0.0.1:{port}/write")
        for i in range(10_000):
            http.count("jobs", {"k": str(i % 10)})
            http.observe("lat", float(i))
        started = time.monotonic()
        assert http.flush() is False
        assert http.dropped_batches >= 1 and time.monotonic() - started < 3
    udp = Metrics("udp://127.0.0.1:9")  # discard port: nobody listens
    udp.count("jobs")
    udp.flush()
    udp.flush()  # ICMP refusals surface as errors on later sends: counted, not raised
    assert udp.sent_batches + udp.dropped_batches >= 2


def test_counters_are_totals_and_observations_are_summaries() -> None:
    m = Metrics("udp://127.0.0.1:9", tags={"host": "h"})
    m.count("c", {"t": "x"})
    m.count("c", {"t": "x"}, n=2)
    for v in range(1, 101):
        m.observe("o", float(v))
    first = {line.split(" ")[0]: line for line in m.lines(1)}
    assert first["c,host=h,t=x"].startswith("c,host=h,t=x n=3i")
    o = first["o,host=h"]
    assert "count=100i" in o and "p50=50.0" in o and "max=100.0" in o and "min=1.0" in o
    again = {line.split(" ")[0]: line for line in m.lines(2)}
    assert "c,host=h,t=x" in again and "o,host=h" not in again  # totals stay, summaries reset
