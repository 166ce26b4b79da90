"""A short command loads only what it uses: the command line's start does not load
PostgreSQL's client or the store, and waiting on jobs loads psycopg without the store's
façade and pool (each costs tens of milliseconds of a 0.3 s command)."""

from __future__ import annotations

import json
import subprocess
import sys


def loaded_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport json, sys; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_the_command_line_starts_without_the_database_client() -> None:
    mods = loaded_after("import agents.ops.cli")
    assert "typer" in mods
    assert not {m for m in mods if m.startswith(("psycopg", "agents.store"))}
    assert "rich.table" not in mods and "rich.progress" not in mods


def test_watching_jobs_loads_psycopg_but_not_the_store() -> None:
    mods = loaded_after("import agents.store.watch")
    assert "psycopg" in mods
    assert "psycopg_pool" not in mods
    assert "agents.store.jobstore" not in mods and "agents.store.cycle" not in mods


def test_the_store_names_still_load_on_use() -> None:
    mods = loaded_after("from agents.store import PostgresJobStore, migrations")
    assert "agents.store.jobstore" in mods and "psycopg_pool" in mods
