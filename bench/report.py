"""The table: medians per series, ratios against each baseline, peak RSS; and details."""

from __future__ import annotations

import functools
import statistics
from dataclasses import dataclass
from typing import Any

from bench.contenders import OURS
from bench.procstat import CpuUse
from bench.runner import ScenarioResult

HEADER = (
    "scenario",
    "ours MB/s",
    "baseline",
    "baseline MB/s",
    "ratio",
    "target",
    "met",
    "our peak RSS",
)


@dataclass(frozen=True)
class Row:
    scenario: str
    ours: float
    baseline: str | None  # None: a scenario without a baseline (its target is on memory)
    base: float | None
    ratio: float | None
    target: float | None  # the least ratio
    peak_rss_kib: int | None
    max_rss_mib: int | None = None  # the most peak RSS

    @property
    def met(self) -> bool | None:
        checks: list[bool] = []
        if self.target is not None and self.ratio is not None:
            checks.append(self.ratio >= self.target)
        if self.max_rss_mib is not None:
            rss = self.peak_rss_kib
            checks.append(rss is not None and rss <= self.max_rss_mib * 1024)
        return all(checks) if checks else None

    def cells(self) -> tuple[str, ...]:
        met = {None: "", True: "yes", False: "NO"}[self.met]
        targets = []
        if self.target is not None:
            targets.append(f">= {self.target:.2f}")
        if self.max_rss_mib is not None:
            targets.append(f"RSS <= {self.max_rss_mib} MiB")
        return (
            self.scenario,
            f"{self.ours:.0f}",
            self.baseline or "-",
            "-" if self.base is None else f"{self.base:.0f}",
            "-" if self.ratio is None else f"{self.ratio:.2f}",
            ", ".join(targets),
            met,
            _mib(self.peak_rss_kib),
        )


def _mib(kib: int | None) -> str:
    return "?" if kib is None else f"{kib / 1024:.0f} MiB"


def rows(results: list[ScenarioResult]) -> list[Row]:
    """One row per server and comparison whose baseline was measured; a server with none
    (no baseline in the scenario, or none could run) gets one row of its own figures."""
    out: list[Row] = []
    for result in results:
        scenario = result.scenario
        for server in result.servers:
            ours = statistics.median(result.mbps[server.series])
            label = server.series.removeprefix(OURS)
            name = f"{scenario.name} {label}" if label else scenario.name
            row = functools.partial(
                Row, name, ours, peak_rss_kib=server.peak_rss_kib, max_rss_mib=scenario.max_rss_mib
            )
            compared = [c for c in scenario.comparisons if result.mbps.get(c.baseline)]
            for comparison in compared:
                base = statistics.median(result.mbps[comparison.baseline])
                out.append(row(comparison.baseline, base, ours / base, comparison.target))
            if not compared:
                out.append(row(None, None, None, None))
    return out


def table(table_rows: list[Row]) -> str:
    """A Markdown table: readable in a terminal, and pasted as is into bench/README.md."""
    cells = [HEADER, *(r.cells() for r in table_rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(HEADER))]
    numeric = {1, 3, 4}

    def line(row: tuple[str, ...]) -> str:
        parts = [
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join(
            "-" * (w + 1) + ":" if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def _cpu_summary(runs: list[CpuUse]) -> str:
    wall = statistics.median(r.wall for r in runs)
    main = statistics.median(r.main.cpu for r in runs)
    main_wait = statistics.median(r.main.wait for r in runs)
    ranks = min(max((len(r.others) for r in runs), default=0), 6)
    others = [
        (
            statistics.median(r.others[i].cpu if i < len(r.others) else 0.0 for r in runs),
            statistics.median(r.others[i].wait if i < len(r.others) else 0.0 for r in runs),
        )
        for i in range(ranks)
    ]
    threads = ", ".join(f"{c:.2f} (+{w:.2f})" for c, w in others) or "none"
    return (
        f"wall {wall:.2f}s; main thread {main:.2f}s (+{main_wait:.2f}s waiting for a CPU), "
        f"other threads {threads} s"
    )


def details(results: list[ScenarioResult]) -> str:
    lines: list[str] = []
    for result in results:
        lines.append(f"{result.scenario.name}: {result.scenario.description}")
        names = [*result.mbps, *(c.baseline for c in result.scenario.comparisons)]
        width = max([16, *(len(name) for name in names)])
        for comparison in result.scenario.comparisons:
            if not result.mbps.get(comparison.baseline):
                lines.append(f"  {comparison.baseline:<{width}} not measured (see the note above)")
        for series, values in result.mbps.items():
            per_round = " ".join(f"{v:.0f}" for v in values)
            lines.append(f"  {series:<{width}} MB/s per round: {per_round}")
        for contender, runs in result.cpu.items():
            lines.append(f"  {contender} CPU per run (median): {_cpu_summary(runs)}")
        for server in result.servers:
            lines.append(
                f"  {server.series} server RSS: {_mib(server.idle_rss_kib)} idle, "
                f"{_mib(server.peak_rss_kib)} peak (VmHWM); code from {server.code}"
            )
    return "\n".join(lines)


def as_json(results: list[ScenarioResult], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        **meta,
        "rows": [
            {
                "scenario": r.scenario,
                "ours_mbps": r.ours,
                "baseline": r.baseline,
                "baseline_mbps": r.base,
                "ratio": r.ratio,
                "target": r.target,
                "met": r.met,
                "peak_rss_kib": r.peak_rss_kib,
                "max_rss_mib": r.max_rss_mib,
            }
            for r in rows(results)
        ],
        "rounds": {res.scenario.name: res.mbps for res in results},
        "servers": {
            res.scenario.name: [
                {"series": s.series, "code": s.code, "peak_rss_kib": s.peak_rss_kib}
                for s in res.servers
            ]
            for res in results
        },
    }
