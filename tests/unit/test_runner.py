"""Running attempts for real (local processes, no services): commands and Python entry
points in the warm pool, timeouts, cancel, pause/resume, hostile arguments, pools."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from agents.errors import ConfigError
from agents.pools import host_label, pool_of, pools_served, worker_labels
from agents.settings import KindConfig, load_settings
from agents.worker.handle import AttemptHandle
from agents.worker.pypool import RSS_CHECK_EVERY, PyPool
from agents.worker.runner import run_attempt
from streams.events import Dispatch


def dispatch(kind: str, args: dict[str, object] | None = None, job_id: str = "j1") -> Dispatch:
    return Dispatch(
        job_id=job_id,
        attempt=1,
        tenant="acme",
        kind=kind,
        args=args or {},
        timeout_s=None,
        submitted_at=0.0,
        dispatched_at=0.0,
    )


async def test_hostile_arguments_reach_the_process_as_inert_argv(tmp_path: Path) -> None:
    out = tmp_path / "argv.json"
    kind = KindConfig(
        command=[
            "python3",
            "-c",
            "import sys, json; json.dump(sys.argv[1:], open(sys.argv[1], 'w'))",
            str(out),
            "{v}",
        ]
    )
    hostile = "$(touch /tmp/pwned); `id` ; rm -rf / \"' \\ {job_id} ü"
    o = await run_attempt(
        dispatch("x", {"v": hostile}), kind, log_dir=str(tmp_path), kill_grace_s=1
    )
    assert o.ok, o.error
    assert json.loads(out.read_text()) == [str(out), hostile]


async def test_pooled_python_jobs_reuse_members_and_a_timeout_replaces_one(tmp_path: Path) -> None:
    pool = PyPool(2)
    ok = KindConfig(entrypoint="tests.jobfns:record", timeout_s=10)
    results = await asyncio.gather(
        *(
            run_attempt(
                dispatch(
                    "py", {"out": str(tmp_path / f"{i}.json"), "value": i, "steps": 1}, f"p{i}"
                ),
                ok,
                log_dir=str(tmp_path),
                kill_grace_s=1,
                pool=pool,
            )
            for i in range(6)
        )
    )
    assert all(r.ok for r in results)
    assert pool.members == 2  # six jobs, two warm interpreters
    pids = {m.proc.pid for m in pool.idle}
    hang = KindConfig(entrypoint="tests.jobfns:hang", timeout_s=0.3)
    o = await run_attempt(
        dispatch("py", {"seconds": 30}, "hang"),
        hang,
        log_dir=str(tmp_path),
        kill_grace_s=1,
        pool=pool,
    )
    assert not o.ok and o.retryable and "timed out after 0.3 s" in o.error
    assert len(pool.idle) == 1 and pool.idle[0].proc.pid in pids  # the hung member is gone
    crash = KindConfig(entrypoint="tests.jobfns:die", timeout_s=5)
    o = await run_attempt(
        dispatch("py", {"code": 7}, "die"), crash, log_dir=str(tmp_path), kill_grace_s=1, pool=pool
    )
    assert not o.ok and o.exit_code == 7
    missing = KindConfig(entrypoint="tests.jobfns:nothing_here", timeout_s=5)
    o = await run_attempt(
        dispatch("py", {}, "miss"), missing, log_dir=str(tmp_path), kill_grace_s=1, pool=pool
    )
    assert not o.ok and not o.retryable and "nothing_here" in o.error
    await pool.close()


async def test_a_pool_member_is_reused_until_it_grows_past_its_size_limit(
    tmp_path: Path,
) -> None:
    kind = KindConfig(entrypoint="tests.jobfns:noop", timeout_s=10)

    async def run(pool: PyPool, n: int) -> set[int]:
        pids = set()
        for i in range(n):
            o = await run_attempt(
                dispatch("py", {}, f"n{i}"), kind, log_dir=str(tmp_path), kill_grace_s=1, pool=pool
            )
            assert o.ok, o.error
            pids |= {m.proc.pid for m in pool.idle}
        return pids

    roomy = PyPool(1, max_rss_mb=4096)
    assert len(await run(roomy, 2 * RSS_CHECK_EVERY + 1)) == 1  # one interpreter throughout
    assert roomy.recycled == 0
    tight = PyPool(1, max_rss_mb=1)  # every interpreter is larger: replaced at each check
    assert len(await run(tight, RSS_CHECK_EVERY + 1)) == 2
    assert tight.recycled == 1
    counted = PyPool(1, max_jobs=3)
    assert len(await run(counted, 7)) == 3 and counted.recycled == 2
    for pool in (roomy, tight, counted):
        await pool.close()


async def test_a_pooled_job_sees_only_its_own_environment(tmp_path: Path) -> None:
    pool = PyPool(1)
    out = tmp_path / "env.json"
    names = ["KIND_VAR", "LEAKED", "JOBSTREAM_JOB_ID", "HOME"]
    with_var = KindConfig(entrypoint="tests.jobfns:getenv", env={"KIND_VAR": "1"})
    plain = KindConfig(entrypoint="tests.jobfns:getenv")
    setter = KindConfig(entrypoint="tests.jobfns:setenv")

    async def seen(kind: KindConfig, job_id: str) -> dict[str, str | None]:
        args = {"out": str(out), "names": names}
        o = await run_attempt(
            dispatch("py", args, job_id), kind, log_dir=str(tmp_path), kill_grace_s=1, pool=pool
        )
        assert o.ok, o.error
        return json.loads(out.read_text())  # type: ignore[no-any-return]

    home = os.environ.get("HOME")
    assert await seen(with_var, "a") == {
        "KIND_VAR": "1",
        "LEAKED": None,
        "JOBSTREAM_JOB_ID": "a",
        "HOME": home,
    }
    assert (await seen(plain, "b"))["KIND_VAR"] is None  # the last job's variable is gone
    o = await run_attempt(
        dispatch("py", {"name": "LEAKED", "value": "x"}, "c"),
        setter,
        log_dir=str(tmp_path),
        kill_grace_s=1,
        pool=pool,
    )
    assert o.ok, o.error
    after = await seen(plain, "d")  # what a job set itself does not reach the next one
    assert after == {"KIND_VAR": None, "LEAKED": None, "JOBSTREAM_JOB_ID": "d", "HOME": home}
    assert pool.members == 1
    await pool.close()


async def test_paused_time_does_not_count_against_the_timeout(tmp_path: Path) -> None:
    kind = KindConfig(command=["sleep", "0.6"], timeout_s=1.0)
    h = AttemptHandle()
    task = asyncio.create_task(
        run_attempt(dispatch("s"), kind, log_dir=str(tmp_path), kill_grace_s=1, handle=h)
    )
    await h.started.wait()
    assert h.pause()
    await asyncio.sleep(1.5)  # longer than the timeout, but paused (SIGSTOP)
    assert not task.done()
    assert h.resume()
    o = await task
    assert o.ok, o.error


async def test_cancel_stops_the_process_group_and_is_not_retryable(tmp_path: Path) -> None:
    kind = KindConfig(command=["sh", "-c", "sleep 30 & sleep 30"], timeout_s=60)
    h = AttemptHandle()
    task = asyncio.create_task(
        run_attempt(dispatch("c"), kind, log_dir=str(tmp_path), kill_grace_s=1, handle=h)
    )
    await h.started.wait()
    started = time.monotonic()
    h.cancel("cancelled: enough")
    o = await task
    assert not o.ok and not o.retryable and o.error == "cancelled: enough"
    assert time.monotonic() - started < 5


async def test_nokill_kinds_have_no_timeout(tmp_path: Path) -> None:
    kind = KindConfig(command=["sleep", "0.5"], timeout_s=0.1, nokill=True)
    o = await run_attempt(dispatch("n"), kind, log_dir=str(tmp_path), kill_grace_s=1)
    assert o.ok, o.error


async def test_progress_file_is_removed_after_the_attempt_unless_its_directory_is_swept(
    tmp_path: Path,
) -> None:
    kind = KindConfig(
        command=[
            "python3",
            "-c",
            "import os; open(os.environ['JOBSTREAM_PROGRESS_FILE'], 'w').write('0.5')",
        ]
    )
    h = AttemptHandle()
    o = await run_attempt(
        dispatch("p"), kind, log_dir=str(tmp_path / "logs"), kill_grace_s=1, handle=h
    )
    assert o.ok, o.error
    assert h.progress_file is not None and not h.progress_file.exists()
    swept = tmp_path / "progress"
    swept.mkdir()
    h2 = AttemptHandle()
    o = await run_attempt(
        dispatch("p", job_id="j2"),
        kind,
        log_dir=str(tmp_path / "logs"),
        kill_grace_s=1,
        handle=h2,
        progress_dir=swept,
    )
    assert o.ok, o.error
    # left for the owner of the directory (the worker sweeps it once per heartbeat)
    assert h2.progress_file is not None and h2.progress_file.parent == swept
    assert h2.progress_file.read_text() == "0.5"


def test_pools_follow_labels_and_local_kinds() -> None:
    s = load_settings(
        {},
        kinds={
            "gpu": {"command": ["true"], "labels": ["gpu", "eu"]},
            "here": {"command": ["true"], "local": True},
            "any": {"command": ["true"]},
        },
        scheduler_host="sched.example",
    )
    assert pool_of(s, "gpu") == "eu_gpu" and pool_of(s, "any") is None
    assert pool_of(s, "here") == "host-sched.example"
    assert pools_served(s, frozenset({"gpu"})) == set()
    assert pools_served(s, frozenset({"gpu", "eu", "x"})) == {"eu_gpu"}
    assert host_label() in worker_labels(s)
    assert host_label("we!rd host") == "host-we-rd-host"


def test_kind_and_label_validation() -> None:
    with pytest.raises(ConfigError, match="exactly one of command"):
        load_settings({}, kinds={"k": {"command": ["true"], "entrypoint": "a:b"}})
    with pytest.raises(ConfigError, match="exactly one of command"):
        load_settings({}, kinds={"k": {"timeout_s": 3}})
    with pytest.raises(ConfigError):
        load_settings({}, kinds={"k": {"command": ["true"], "labels": ["a_b"]}})
    s = load_settings({"JOBSTREAM_WORKER_LABELS": "gpu, eu"})
    assert s.worker_labels == ["gpu", "eu"]


async def test_a_failing_jobs_secrets_do_not_travel_in_its_error(tmp_path: Path) -> None:
    kind = KindConfig(
        command=["sh", "-c", 'echo "login with $API_TOKEN refused" >&2; exit 1'],
        env={"API_TOKEN": "tok-5ecret-42"},
    )
    o = await run_attempt(dispatch("x"), kind, log_dir=str(tmp_path), kill_grace_s=1)
    assert not o.ok and "refused" in o.error
    assert "tok-5ecret-42" not in o.error and "***" in o.error


async def test_a_log_directory_removed_after_first_use_is_made_again(tmp_path: Path) -> None:
    kind = KindConfig(command=["true"])
    first = await run_attempt(dispatch("x"), kind, log_dir=str(tmp_path), kill_grace_s=1)
    assert first.ok and first.log_path
    os.unlink(first.log_path)
    os.rmdir(os.path.dirname(first.log_path))
    again = await run_attempt(
        dispatch("x", job_id="j2"), kind, log_dir=str(tmp_path), kill_grace_s=1
    )
    assert again.ok, again.error
    (tmp_path / "acme").rename(tmp_path / "gone")
    (tmp_path / "acme").write_text("a file where the directory goes")
    blocked = await run_attempt(
        dispatch("x", job_id="j3"), kind, log_dir=str(tmp_path), kill_grace_s=1
    )
    assert not blocked.ok and blocked.retryable and "could not run the job" in blocked.error


async def test_a_pause_never_reaches_a_pool_member_after_the_job_left_it(tmp_path: Path) -> None:
    """Item 8: the handle kept the member's process after the job returned it to the pool,
    so pausing the finished job stopped the member under the next job."""
    pool = PyPool(1)
    kind = KindConfig(entrypoint="tests.jobfns:record", timeout_s=10)
    try:
        first = AttemptHandle()
        args = {"out": str(tmp_path / "a.json"), "value": 1, "steps": 1}
        done = await run_attempt(
            dispatch("py", args, "a"),
            kind,
            log_dir=str(tmp_path),
            kill_grace_s=1,
            handle=first,
            pool=pool,
        )
        assert done.ok, done.error
        assert not first.pause()  # the job is over: nothing to stop
        args = {"out": str(tmp_path / "b.json"), "value": 2, "steps": 2}
        second = await asyncio.wait_for(
            run_attempt(
                dispatch("py", args, "b"), kind, log_dir=str(tmp_path), kill_grace_s=1, pool=pool
            ),
            5,
        )
        assert second.ok, second.error
    finally:
        await pool.close()


async def test_a_pause_sent_before_the_process_exists_holds_it_until_resumed(
    tmp_path: Path,
) -> None:
    out = tmp_path / "p.json"
    kind = KindConfig(entrypoint="tests.jobfns:record", timeout_s=30)
    pool = PyPool(1)
    try:
        h = AttemptHandle()
        assert h.pause()  # the dispatch is here, its process not yet
        task = asyncio.create_task(
            run_attempt(
                dispatch("py", {"out": str(out), "value": 3, "steps": 2}, "p"),
                kind,
                log_dir=str(tmp_path),
                kill_grace_s=1,
                handle=h,
                pool=pool,
            )
        )
        await asyncio.sleep(1.0)
        assert not task.done() and not out.exists() and h.paused_since is not None
        assert h.resume()
        o = await asyncio.wait_for(task, 10)
        assert o.ok and out.exists()
    finally:
        await pool.close()


async def test_a_timed_out_job_that_ignores_sigterm_is_killed_with_its_children(
    tmp_path: Path,
) -> None:
    """SIGTERM to the process group, SIGKILL after the grace: the job's process and a child
    it left in the background are both gone when the outcome is reported."""
    pids = tmp_path / "pids"
    kind = KindConfig(
        command=[
            "sh",
            "-c",
            'trap \'\' TERM; sleep 60 & echo $! >> "$1"; echo $$ >> "$1"; '
            "while :; do sleep 1; done",
            "sh",
            str(pids),
        ],
        timeout_s=0.5,
    )
    began = time.monotonic()
    o = await run_attempt(dispatch("x"), kind, log_dir=str(tmp_path), kill_grace_s=0.5)
    assert not o.ok and "timed out" in o.error
    assert time.monotonic() - began < 10
    for pid in map(int, pids.read_text().split()):
        assert not _alive(pid), pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
