"""What the ``jobstream`` commands share: the Typer apps, the consoles and options, and
opening the store for one query."""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console

from agents.errors import ConfigError
from agents.settings import Settings, load_settings

if TYPE_CHECKING:
    from rich.table import Table

    from agents.store import PostgresJobStore
    from agents.store.watch import JobWatch
    from streams.publisher import JobPublisher

T = TypeVar("T")

app = typer.Typer(
    help="jobstream: a Kafka-driven job scheduler with state in PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Create and check the topics of topics.yaml.")
db_app = typer.Typer(help="Database schema.")
config_app = typer.Typer(help="Configuration.")
dl_app = typer.Typer(help="Dead letters: rejected input with its reason.")
wf_app = typer.Typer(help="Workflows: DAGs of dependent jobs.")
app.add_typer(wf_app, name="workflow", rich_help_panel="Submit")
app.add_typer(topics_app, name="topics", rich_help_panel="Set up")
app.add_typer(db_app, name="db", rich_help_panel="Set up")
app.add_typer(config_app, name="config", rich_help_panel="Set up")
app.add_typer(dl_app, name="deadletter", rich_help_panel="Look")

# how each job state is shown
STATE_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "red",
    "running": "cyan",
    "dispatched": "cyan",
    "ready": "yellow",
    "waiting": "dim",
}

out = Console()
err = Console(stderr=True)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="Settings file (YAML).")]


def settings_of(config: Path | None, **overrides: Any) -> Settings:
    return load_settings(file=config, **overrides)


# how long a command waits for Kafka or PostgreSQL to answer before it says so (exit 3)
SERVICE_PROBE_S = 5.0


def publisher(s: Settings) -> JobPublisher:
    """A one-shot publisher for the command's records, once Kafka answers (exit 3 within
    seconds when it does not)."""
    from streams.publisher import JobPublisher
    from streams.topics import load_topics

    registry = load_topics(s.topics_file, prefix=s.topic_prefix)
    pub = JobPublisher(
        s.require_kafka(),
        registry=registry,
        extra=s.kafka_config,
        max_workflow_bytes=s.max_workflow_bytes,
        one_shot=True,
    )
    try:
        return pub.ready(SERVICE_PROBE_S)
    except BaseException:
        pub.close()
        raise


def kafka(s: Settings) -> str:
    """The broker's address once it answers a metadata request: a command that needs Kafka
    says within seconds that it is down (``KafkaUnavailable``: exit 3), instead of failing
    its first send after the delivery timeout."""
    from streams.kafka import wait_for_broker

    bootstrap = s.require_kafka()
    wait_for_broker(bootstrap, s.kafka_config, timeout_s=SERVICE_PROBE_S)
    return bootstrap


def query(config: Path | None, fn: Callable[[PostgresJobStore], Awaitable[T]]) -> T:
    """Open the store, run one query, close it."""
    return query_with(settings_of(config), fn)


def query_with(s: Settings, fn: Callable[[PostgresJobStore], Awaitable[T]]) -> T:
    """:func:`query` with the settings already loaded."""
    import asyncio

    from agents.store import PostgresJobStore

    async def run() -> T:
        store = PostgresJobStore(s.require_database())
        await store.open(timeout_s=SERVICE_PROBE_S)  # down: said within seconds (exit 3)
        try:
            return await fn(store)
        finally:
            await store.close()

    return asyncio.run(run())


def watch(s: Settings) -> JobWatch:
    """A plain connection for reading jobs' states (checks before sending, waiting): the
    store's façade and pool stay unloaded."""
    from agents.store.watch import JobWatch

    return JobWatch(s.require_database(), timeout_s=SERVICE_PROBE_S)


def job_states(s: Settings, ids: list[str]) -> dict[str, str]:
    """The known jobs' states, in one read."""
    with watch(s) as w:
        return w.states(ids)


def missing_or_json(row: Any, missing: str, as_json: bool) -> bool:
    """Exit 1 saying ``missing`` when there is no row (under ``--json`` as the JSON error);
    with ``--json`` print the row and say so."""
    if row is None or row == []:
        if as_json:
            sys.stdout.write(json.dumps({"error": missing, "code": 1}) + "\n")
        else:
            err.print(missing)
        raise typer.Exit(1)
    if as_json:
        emit(row, True)
    return as_json


def table(*headers: str, whole: tuple[str, ...] = ("id",), title: str | None = None) -> Table:
    """A table whose ``whole`` columns (ids, names) wrap on a narrow terminal instead of
    being cut: an id is only useful complete; other columns give way first."""
    from rich.table import Table

    t = Table(title=title)
    for h in headers:
        if h in whole:
            t.add_column(h, overflow="fold", min_width=8)
        else:
            t.add_column(h, overflow="ellipsis")
    return t


def name_values(items: list[str] | None, option: str = "--arg") -> dict[str, str]:
    """``NAME=VALUE`` options as a mapping (a ConfigError names one without ``=``)."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"{option} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def emit(data: Any, as_json: bool) -> None:
    if as_json:
        sys.stdout.write(json.dumps(data, default=str) + "\n")
    else:
        out.print(data)
