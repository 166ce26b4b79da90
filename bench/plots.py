"""PNG plots of the side-by-side scenarios (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {
    "jobstream": "#1f77b4",
    "jobstream-fifo": "#9ecae1",
    "celery": "#2ca02c",
    "procrastinate": "#ff7f0e",
    "floor": "#7f7f7f",
}


def _bars(ax: Any, values: dict[str, float | None], ylabel: str, title: str) -> None:
    names = [n for n, v in values.items() if v is not None]
    heights = [float(values[n] or 0) for n in names]
    bars = ax.bar(names, heights, color=[COLOURS.get(n, "grey") for n in names])
    ax.bar_label(bars, fmt="%g")
    ax.set_ylabel(ylabel)
    ax.set_title(title)


def plot(result: dict[str, Any], path: Path) -> None:
    scenario = result["scenario"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    left, right = axes
    if scenario == "throughput":
        _bars(left, result["jobs_per_s"], "jobs/s (median)", f"{result['jobs']} no-op jobs")
        runs = result["jobs_per_s_runs"]
        for name, v in runs.items():
            right.plot(range(1, len(v) + 1), v, "o-", label=name, color=COLOURS.get(name))
        right.set_xlabel("round")
        right.set_ylabel("jobs/s")
        right.set_title("each round (order rotates)")
        right.legend()
    elif scenario == "latency":
        for name, v in result["systems"].items():
            levels = sorted(v["levels"], key=float)
            xs = [float(x) * 100 for x in levels]
            for ax, key in ((left, "submit_to_start_ms"), (right, "submit_to_finish_ms")):
                ax.plot(
                    xs,
                    [v["levels"][x][key]["p50"] for x in levels],
                    "o-",
                    color=COLOURS.get(name),
                    label=f"{name} p50",
                )
                ax.plot(
                    xs,
                    [v["levels"][x][key]["p99"] for x in levels],
                    "s--",
                    color=COLOURS.get(name),
                    label=f"{name} p99",
                )
        for ax, title in ((left, "submit → start"), (right, "submit → finish")):
            ax.set_yscale("log")
            ax.set_xlabel("load, % of each system's saturation")
            ax.set_ylabel("ms")
            ax.set_title(title)
            ax.legend(fontsize=7)
    elif scenario == "dag":
        _bars(
            left,
            result["workflows_per_s"],
            "workflows/s (median)",
            f"{result['uploads']} FOSSology workflows",
        )
        unlock = result["unlock_ms"]
        names = list(unlock)
        x = range(len(names))
        left_bars = right.bar(
            [i - 0.2 for i in x], [unlock[n]["p50"] or 0 for n in names], 0.4, label="p50"
        )
        right_bars = right.bar(
            [i + 0.2 for i in x], [unlock[n]["p99"] or 0 for n in names], 0.4, label="p99"
        )
        right.bar_label(left_bars, fmt="%.0f", fontsize=7)
        right.bar_label(right_bars, fmt="%.0f", fontsize=7)
        right.set_xticks(list(x), names)
        right.set_ylabel("ms")
        right.set_title("unlock: last dependency finished → dependent started")
        right.legend()
    elif scenario == "fairness":
        systems = result["systems"]
        classes = ["small", "medium", "large", "huge"]
        width = 0.8 / max(1, len(systems))
        for i, (name, v) in enumerate(systems.items()):
            ys = [v["mean_slowdown_by_class"].get(c, 0) for c in classes]
            left.bar(
                [c + i * width for c in range(len(classes))],
                ys,
                width,
                label=name,
                color=COLOURS.get(name),
            )
        left.set_xticks([c + 0.4 - width / 2 for c in range(len(classes))], classes)
        left.set_yscale("log")
        left.set_ylabel("mean slowdown (÷ time alone)")
        left.set_title("slowdown by upload size")
        left.legend(fontsize=7)
        _bars(
            right,
            {n: v["small_p95_completion_s"] for n, v in systems.items()},
            "s",
            "small uploads: p95 completion time",
        )
    elif scenario == "ratelimit":
        systems = {n: v for n, v in result["systems"].items() if v.get("supported")}
        _bars(
            left,
            {n: v["violations_at_start"] for n, v in systems.items()},
            "windows over the limit",
            f"violations ({result['limit']})",
        )
        _bars(
            right,
            {n: v["utilisation"] for n, v in systems.items()},
            "admitted ÷ allowed",
            "utilisation at 10× demand",
        )
    elif scenario == "delayed":
        systems = result["systems"]
        for ax, key, what in (
            (left, "lateness_p50_ms", "p50"),
            (right, "lateness_p99_ms", "p99"),
        ):
            _bars(
                ax,
                {n: v[key] for n, v in systems.items()},
                "ms after the due instant",
                f"start lateness {what}, {result['jobs']} jobs due at once",
            )
    elif scenario == "scale":
        systems = result["systems"]
        _bars(
            left,
            {n: v.get("bytes_per_job") for n, v in systems.items()},
            "bytes per queued job",
            "memory / storage per queued job",
        )
        js = systems.get("jobstream", {})
        _bars(
            right,
            {"jobstream": js.get("decisions_per_s")},
            "decisions/s",
            f"admission core, {js.get('queued', 0):,} queued",
        )
    elif scenario == "floor":
        w, u = result["worker"], result["unlock"]
        _bars(
            left,
            {"jobstream": w["jobstream_us_per_job_median"], "floor": w["floor_us_per_job_median"]},
            "worker CPU µs per pooled no-op (median of rounds)",
            "worker: jobstream vs the bare loop",
        )
        left.axhline(w["target_us_per_job"], color="red", linestyle="--", label="target")
        left.legend()
        # p99 once warm: jobstream after its first 5 workflows, the floor after its warm-up
        names = ["jobstream p50", "floor p50", "jobstream p99", "floor p99"]
        values = [
            u["jobstream_p50_ms_median"],
            u["floor_p50_ms_median"],
            u["jobstream_p99_warm_ms_median"],
            u["floor_p99_warm_ms_median"],
        ]
        bars = right.bar(names, values, color=[COLOURS["jobstream"], COLOURS["floor"]] * 2)
        right.bar_label(bars, fmt="%g")
        right.axhline(u["target_ms"]["p50"], color="red", linestyle="--", label="target p50")
        right.axhline(u["target_ms"]["p99"], color="red", linestyle=":", label="target p99")
        right.set_ylabel("ms (median of rounds)")
        right.set_title("unlock, p99 once warm: jobstream vs the bare chain")
        right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
