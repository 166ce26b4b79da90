"""``python -m bench.report [--small] [--only a,b] [--from-json]``: run every side-by-side
scenario, keep each result (``docs/bench/<scenario>.json``) and plot
(``docs/bench/<scenario>.png``), and regenerate the results section of
``docs/performance.md`` (between the ``compare:begin``/``compare:end`` markers) with the
machine it ran on. ``--from-json`` redraws tables and plots from the kept results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.__main__ import COMPARED, SIZES
from bench.compare import SCENARIOS
from bench.plots import plot

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "bench"
DOC = ROOT / "docs" / "performance.md"
BEGIN, END = "<!-- compare:begin -->", "<!-- compare:end -->"
SYSTEMS = ["jobstream", "celery", "procrastinate"]


def kafka_default() -> str:
    """The broker version ``scripts/kafka.sh`` starts when ``KAFKA_VERSION`` is not set."""
    script = (Path(__file__).resolve().parent.parent / "scripts/kafka.sh").read_text()
    found = re.search(r'KAFKA_VERSION="\$\{KAFKA_VERSION:-([0-9.]+)\}"', script)
    return found.group(1) if found else "unknown"


def machine() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    versions = ", ".join(
        f"{p} {metadata.version(p)}"
        for p in ("confluent-kafka", "faust-streaming", "psycopg", "celery", "procrastinate")
    )
    kafka = os.environ.get("KAFKA_VERSION") or kafka_default()
    pg = subprocess.run(["psql", "--version"], capture_output=True, text=True).stdout.strip()
    return (
        f"{os.cpu_count()} cores ({cpu}), {mem_kb / 2**20:.0f} GiB, Python "
        f"{platform.python_version()}; {versions}; "
        f"Kafka {kafka} (KRaft, one broker), "
        f"{pg.replace('psql (PostgreSQL) ', 'PostgreSQL ')}, Redis 7.0 (append-only, fsync every "
        "second); everything on loopback, sharing the two cores"
    )


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.2f}" if v < 100 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def tables(results: dict[str, dict[str, Any]]) -> str:
    out: list[str] = []
    if r := results.get("throughput"):
        out += [
            f"### throughput — {r['jobs']:,} no-op jobs at once, {r['slots']} slots, "
            f"median of {len(next(iter(r['jobs_per_s_runs'].values())))} rounds",
            "",
            "| system | jobs/s (median) | each round | jobstream ÷ it |",
            "|---|---|---|---|",
        ]
        for n, v in r["jobs_per_s"].items():
            runs = ", ".join(_fmt(x) for x in r["jobs_per_s_runs"][n])
            out.append(f"| {n} | {_fmt(v)} | {runs} | {_fmt(r.get(f'jobstream_vs_{n}'))} |")
        out += ["", "![throughput](bench/throughput.png)", ""]
    if r := results.get("latency"):
        out += [
            f"### latency — paced no-op load, {r['seconds_per_level']:g} s per level",
            "",
            "| system | saturation jobs/s | load | submit→start p50 / p99 ms | "
            "submit→finish p50 / p99 ms |",
            "|---|---|---|---|---|",
        ]
        for n, v in r["systems"].items():
            for level, x in sorted(v["levels"].items(), key=lambda kv: float(kv[0])):
                st, fi = x["submit_to_start_ms"], x["submit_to_finish_ms"]
                out.append(
                    f"| {n} | {_fmt(v['saturation_jobs_per_s'])} | {float(level):.0%} "
                    f"({_fmt(x['rate_per_s'])}/s) | {_fmt(st['p50'])} / {_fmt(st['p99'])} | "
                    f"{_fmt(fi['p50'])} / {_fmt(fi['p99'])} |"
                )
        out += ["", "![latency](bench/latency.png)", ""]
    if r := results.get("dag"):
        out += [
            f"### dag — {r['uploads']:,} FOSSology workflows (9 jobs each) at once",
            "",
            "| system | workflows/s | unlock p50 ms | unlock p99 ms | jobstream ÷ it |",
            "|---|---|---|---|---|",
        ]
        for n, v in r["workflows_per_s"].items():
            u = r["unlock_ms"][n]
            out.append(
                f"| {n} | {_fmt(v)} | {_fmt(u['p50'])} | {_fmt(u['p99'])} | "
                f"{_fmt(r.get(f'jobstream_vs_{n}'))} |"
            )
        out += ["", f"{r['note']}.", "", "![dag](bench/dag.png)", ""]
    if r := results.get("fairness"):
        out += [
            f"### fairness — {r['uploads']} uploads, {r['chunks']} chunks of "
            f"{r['unit_s']:g} s, {r['slots']} slots, one huge upload first",
            "",
            "| system | small: mean slowdown while huge runs | max slowdown | "
            "small p95 completion s | slowdown small / medium / large / huge |",
            "|---|---|---|---|---|",
        ]
        for n, v in r["systems"].items():
            c = v["mean_slowdown_by_class"]
            classes = " / ".join(_fmt(c.get(k)) for k in ("small", "medium", "large", "huge"))
            out.append(
                f"| {n} | {_fmt(v['small_mean_slowdown_while_huge_runs'])} | "
                f"{_fmt(v['max_slowdown'])} | {_fmt(v['small_p95_completion_s'])} | {classes} |"
            )
        better = ", ".join(f"{k} {_fmt(v)}×" for k, v in r["small_p95_better_than"].items())
        out += [
            "",
            f"Small uploads' p95 completion, jobstream better than: {better}.",
            "",
            "![fairness](bench/fairness.png)",
            "",
        ]
    if r := results.get("ratelimit"):
        out += [
            f"### ratelimit — {r['limit']}, {r['tenants']} tenants, demand 10× "
            f"({r['demand_per_tenant']:,} jobs per tenant at once), measured over "
            f"{r['measured_s']:g} s from {r.get('measured_from_s', 0):g} s after the first start",
            "",
            "| system | violations at start | violations at admission | utilisation at start |"
            " utilisation at admission |",
            "|---|---|---|---|---|",
        ]
        for n, v in r["systems"].items():
            if not v.get("supported"):
                out.append(f"| {n} | — | — | — | {v['note']} |")
                continue
            out.append(
                f"| {n} | {_fmt(v['violations_at_start'])} | "
                f"{_fmt(v.get('violations_at_admission'))} | {_fmt(v['utilisation'])} | "
                f"{_fmt(v.get('utilisation_at_admission'))} |"
            )
        out += ["", f"{r['note']}.", "", "![ratelimit](bench/ratelimit.png)", ""]
    if r := results.get("delayed"):
        out += [
            f"### delayed — {r['jobs']:,} no-op jobs due at the same instant, {r['slots']} slots",
            "",
            "| system | start lateness p50 ms | p99 ms | max ms | started early |",
            "|---|---|---|---|---|",
        ]
        for n, v in r["systems"].items():
            out.append(
                f"| {n} | {_fmt(v['lateness_p50_ms'])} | {_fmt(v['lateness_p99_ms'])} | "
                f"{_fmt(v['lateness_max_ms'])} | {_fmt(v['early'])} |"
            )
        out += ["", f"{r['note']}.", "", "![delayed](bench/delayed.png)", ""]
    if r := results.get("scale"):
        out += [
            f"### scale — {r['tenants']:,} tenants",
            "",
            "| system | queued | bytes per queued job | admission decisions/s | enqueue/s |",
            "|---|---|---|---|---|",
        ]
        for n, v in r["systems"].items():
            out.append(
                f"| {n} | {_fmt(v['queued'])} | {_fmt(v['bytes_per_job'])} | "
                f"{_fmt(v.get('decisions_per_s'))} | {_fmt(v.get('enqueue_per_s'))} |"
            )
        out += ["", "![scale](bench/scale.png)", ""]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--only", default=",".join(COMPARED))
    parser.add_argument("--from-json", action="store_true")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    for scenario in COMPARED:
        path = OUT / f"{scenario}.json"
        if scenario in args.only.split(",") and not args.from_json:
            params = dict(SIZES[scenario][1 if args.small else 0])
            result = SCENARIOS[scenario](**params, systems=SYSTEMS, show=True)
            result["machine"] = machine()
            path.write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps(result))
        if path.exists():
            results[scenario] = json.loads(path.read_text())
            plot(results[scenario], OUT / f"{scenario}.png")
    text = DOC.read_text()
    ran_on = next((r["machine"] for r in results.values() if "machine" in r), machine())
    apart = "".join(
        f"`{name}` was run on its own, later: {r['machine']}.\n\n"
        for name, r in results.items()
        if r.get("machine", ran_on) != ran_on
    )
    section = f"{BEGIN}\nMachine: {ran_on}.\n\n{apart}{tables(results)}\n{END}"
    if BEGIN in text:
        marked = re.escape(BEGIN) + ".*?" + re.escape(END)
        text = re.sub(marked, lambda _: section, text, flags=re.S)
    else:
        text += f"\n## Side by side: Celery and procrastinate\n\n{section}\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
