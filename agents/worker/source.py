"""What the worker's parts need from the way dispatches arrive: a consumer group
(``agents.worker.consumer``, the default) or a share group (``agents.worker.share``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from agents.worker.commits import CommitWaits

TP = tuple[str, int]


class Handover(Protocol):
    """Which fetched dispatches Kafka still owns: ``started`` on arrival, ``finished`` once
    the job's start is on the broker (or the dispatch was skipped)."""

    def started(self, tp: TP, offset: int) -> None: ...

    def finished(self, tp: TP, offset: int) -> None: ...

    def forget(self, tp: TP) -> None: ...


class DispatchSource(Protocol):
    id: str
    assigned: asyncio.Event
    paused: bool
    waits: CommitWaits
    on_drop: Callable[[set[TP]], None]

    @property
    def tracker(self) -> Handover: ...

    @property
    def owned(self) -> frozenset[TP]:
        """The dispatch partitions this worker answers for (the monitor hands back a
        dispatch nobody answers for)."""
        ...

    async def call(self, fn: Any, *args: Any, **kw: Any) -> Any: ...

    async def subscribe(self, topics: list[str]) -> None: ...

    async def fetch(self, room: int) -> list[Any]: ...

    async def consume_now(self, n: int) -> list[Any]: ...

    async def set_paused(self, paused: bool) -> None: ...

    async def leave_group(self) -> None: ...

    def commit_soon(self) -> None: ...

    async def commit(self) -> None: ...

    async def committed_past(self, topic: str, partition: int, offset: int) -> bool: ...

    def lag(self) -> int: ...

    async def close(self) -> None: ...
