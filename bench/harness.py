"""A benchmark run on real services: a fresh database and topic prefix, scheduler and worker
subprocesses, and a progress bar while jobs finish. Torn down (processes, database) on exit.

Needs a Kafka broker and PostgreSQL (``make services`` starts both on loopback):
JOBSTREAM_KAFKA_BOOTSTRAP (default 127.0.0.1:19092) and JOBSTREAM_BENCH_PG (default
postgresql://postgres@127.0.0.1:15432/postgres).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg import sql
from rich.progress import Progress

from agents.settings import load_settings
from streams.errors import DeliveryFailed
from streams.events import JobSpec
from streams.kafka import apply_topics, delete_topics
from streams.publisher import JobPublisher
from streams.topics import TopicRegistry, load_topics

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


ADMIN_DSN = os.environ.get("JOBSTREAM_BENCH_PG", "postgresql://postgres@127.0.0.1:15432/postgres")


@contextmanager
def fresh_database(name: str, admin_dsn: str = ADMIN_DSN) -> Iterator[str]:
    """A new, empty database for one run (its DSN), dropped afterwards."""
    with psycopg.connect(admin_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield psycopg.conninfo.make_conninfo(admin_dsn, dbname=name)
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


def service(script: str, action: str, **env: str) -> None:
    """Run one of the repository's service scripts (``scripts/<script> start|stop``), e.g. on
    a port of its own: ``service("postgres.sh", "start", PG_PORT="15434")``."""
    subprocess.run(
        [str(ROOT / "scripts" / script), action],
        env={**os.environ, **env},
        check=True,
        capture_output=True,
        timeout=300,
    )


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _procs() -> list[tuple[int, int, str, float]]:
    """Every process: (pid, parent pid, command line, CPU seconds of its own)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text().rsplit(")", 1)[1].split()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        out.append((int(d.name), int(stat[1]), cmd, (int(stat[11]) + int(stat[12])) / CLK_TCK))
    return out


def cpu_by_role(children_of: list[int]) -> dict[str, float]:
    """CPU seconds so far of the services and of the live children of ``children_of`` (the
    workers' warm interpreter pool members): ``postgres`` (every PostgreSQL process),
    ``kafka`` (the broker's JVM), ``pool``."""
    roles = {"postgres": 0.0, "kafka": 0.0, "pool": 0.0}
    parents = set(children_of)
    for _pid, ppid, cmd, cpu in _procs():
        if ppid in parents:
            roles["pool"] += cpu
        elif cmd.startswith("postgres") or "/postgres " in cmd or "bin/postgres" in cmd:
            roles["postgres"] += cpu
        elif "kafka.Kafka" in cmd:
            roles["kafka"] += cpu
    return roles


def machine_busy_s() -> float:
    """CPU seconds the whole machine spent not idle (all cores), from ``/proc/stat``."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def stop_process(p: subprocess.Popen[bytes], grace_s: float = 30) -> None:
    """SIGTERM (if still running), SIGKILL after ``grace_s``; reaped either way."""
    if p.poll() is None:
        p.terminate()
    try:
        p.wait(grace_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


class Feeder(threading.Thread):
    """Submits ``rate`` jobs per second (``make(i)`` is job i) until ``stop()``: every 50 ms
    the jobs due by then, in one batch. A batch the broker does not confirm (it is away) is
    sent again with the jobs due since, as an upstream service would: the same ids, which
    intake accepts once."""

    def __init__(self, run: Run, rate: float, make: Callable[[int], JobSpec]) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.registry = run.bootstrap, run.registry
        self.rate, self.make = rate, make
        self.sent = 0
        self.halt = threading.Event()

    def run(self) -> None:
        with JobPublisher(self.bootstrap, registry=self.registry, linger_ms=5) as pub:
            start = time.monotonic()
            while not self.halt.is_set():
                due = int((time.monotonic() - start) * self.rate)
                if due > self.sent:
                    try:
                        pub.submit_many((self.make(i) for i in range(self.sent, due)), 5.0)
                        self.sent = due
                    except DeliveryFailed:
                        pass  # the broker is away: these jobs again, with the next ones
                self.halt.wait(0.05)

    def stop(self) -> int:
        """Stop submitting; the number of jobs submitted (all confirmed)."""
        self.halt.set()
        self.join(60)
        return self.sent


class Run:
    def __init__(
        self, *, bootstrap: str | None = None, admin_dsn: str = ADMIN_DSN, **settings: str
    ) -> None:
        self.bootstrap = bootstrap or os.environ.get("JOBSTREAM_KAFKA_BOOTSTRAP", "127.0.0.1:19092")
        self.admin_dsn = admin_dsn
        self.name = f"bench{uuid.uuid4().hex[:8]}"
        self.settings = settings
        self.procs: list[subprocess.Popen[bytes]] = []
        self._stack = ExitStack()
        self.dsn = ""
        self.registry: TopicRegistry | None = None
        self.env: dict[str, str] = {}

    def __enter__(self) -> Run:
        self.dsn = self._stack.enter_context(fresh_database(self.name, self.admin_dsn))
        self.registry = load_topics(prefix=self.name + ".")
        apply_topics(self.registry, self.bootstrap)
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("JOBSTREAM_") or k == "JOBSTREAM_LOG_LEVEL"
        }
        env.update(
            JOBSTREAM_KAFKA_BOOTSTRAP=self.bootstrap,
            JOBSTREAM_DATABASE_URL=self.dsn,
            JOBSTREAM_TOPIC_PREFIX=self.name + ".",
            JOBSTREAM_APP_ID=self.name,
            JOBSTREAM_LOG_DIR=f"/tmp/{self.name}/logs",
        )
        env.update({f"JOBSTREAM_{k.upper()}": v for k, v in self.settings.items()})
        self.env = env
        load_settings(env)  # validate the environment like the processes do
        subprocess.run(
            [sys.executable, "-m", "agents.ops.cli", "db", "migrate"],
            env=env,
            check=True,
            cwd=ROOT,
            capture_output=True,
        )
        return self

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start ``jobstream ARGS`` (``env``: extra variables for this process); its output
        goes to ``/tmp/<run>/<n>-<command>.log``."""
        return self.spawn("agents.ops.cli", *args, env=env)

    def spawn(
        self, module: str, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m MODULE ARGS`` in the run's environment, stopped with the run; its
        output goes to ``/tmp/<run>/<n>-<first arg>.log``."""
        logs = Path(f"/tmp/{self.name}")
        logs.mkdir(parents=True, exist_ok=True)
        with (logs / f"{len(self.procs)}-{args[0]}.log").open("ab") as out:
            p = subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env={**self.env, **(env or {})},
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.procs.append(p)
        return p

    def query(self, text: Any, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn) as conn:
            return conn.execute(text, params).fetchall()

    def wait_finished(self, total: int, show: bool, what: str = "jobs", limit_s: float = 600):
        """Wait until ``total`` jobs are terminal (progress bar); the seconds it took."""
        start = time.monotonic()
        with Progress(disable=not show) as progress, psycopg.connect(self.dsn) as conn:
            task = progress.add_task(what, total=total)
            done = 0
            while done < total and time.monotonic() - start < limit_s:
                (done,) = conn.execute(
                    "SELECT count(*) FROM jobs WHERE state IN ('succeeded','failed','cancelled')"
                ).fetchone() or (0,)
                conn.rollback()
                progress.update(task, completed=done)
                self.check_alive()
                time.sleep(0.1)
        return time.monotonic() - start

    def check_alive(self) -> None:
        """Fail now, with its log's tail, if a started process died of an error (exit code
        above 0; processes a scenario kills or stops exit by signal or with 0)."""
        for n, p in enumerate(self.procs):
            if p.poll() is not None and p.returncode > 0:
                logs = sorted(Path(f"/tmp/{self.name}").glob(f"{n}-*.log"))
                tail = logs[0].read_text(errors="replace")[-3000:] if logs else ""
                raise RuntimeError(f"process {p.args!r} exited with {p.returncode}:\n{tail}")

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            stop_process(p, 30)
        self._stack.close()
        drop_topics(self.bootstrap, self.name + ".")


def drop_topics(bootstrap: str, prefix: str) -> None:
    """Delete a run's topics (a broker that keeps every run's partitions gets slower over a
    session, which biases whatever runs later in an interleaved comparison). Best effort: a
    failure only leaves the topics behind."""
    try:
        delete_topics(bootstrap, prefix)
    except Exception as exc:  # clean-up must not fail the measurement
        print(f"bench: could not delete the topics {prefix}*: {exc}", file=sys.stderr)
