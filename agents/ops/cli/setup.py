"""Setting up: ``config check``, ``topics apply``/``check``, ``db migrate``."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from agents.ops.cli.common import (
    ConfigOpt,
    JsonOpt,
    config_app,
    db_app,
    emit,
    kafka,
    out,
    query,
    settings_of,
    topics_app,
)


@config_app.command("check")
def config_check(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Validate the settings and print them with secrets redacted."""
    s = settings_of(config)
    emit(s.redacted(), as_json)


@config_app.command("doc")
def config_doc() -> None:
    """Print the reference table of every setting (docs/configuration.md holds it)."""
    from agents.settings_doc import table

    sys.stdout.write(table())


@topics_app.command("apply")
def topics_apply(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Create missing topics; report topics whose partition count differs (exit 1)."""
    _topics(config, as_json, create=True)


@topics_app.command("check")
def topics_check(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Report missing topics and partition-count differences without changing anything."""
    _topics(config, as_json, create=False)


def _topics(config: Path | None, as_json: bool, *, create: bool) -> None:
    from streams.kafka import apply_topics
    from streams.topics import load_topics

    s = settings_of(config)
    registry = load_topics(s.topics_file, prefix=s.topic_prefix)
    report = apply_topics(registry, kafka(s), s.kafka_config, create=create)
    data = {"created": report.created, "existing": report.existing, "mismatched": report.mismatched}
    if as_json:
        emit(data, True)
    else:
        for name in report.created:
            out.print(f"[green]created[/]  {name}")
        for name in report.existing:
            out.print(f"[dim]exists[/]   {name}")
        for line in report.mismatched:
            out.print(f"[red]differs[/]  {line}")
    if not report.ok:
        raise typer.Exit(1)


@db_app.command("migrate")
def db_migrate(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """Apply pending schema migrations (safe to run from several processes at once)."""
    applied: list[str] = query(config, lambda store: store.migrate())
    emit({"applied": applied}, as_json) if as_json else out.print(
        f"applied {len(applied)} migration(s): {', '.join(applied) or 'none pending'}"
    )
