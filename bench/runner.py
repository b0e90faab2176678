"""Runs a scenario: warm-up, then rounds of ours and each baseline in turn (A B A B ...).
A scenario marked `single_run` runs once, measured, without warm-up."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field

from bench.contenders import Contender, Sample
from bench.procstat import CpuUse, status_kib
from bench.scenarios import Context, Scenario
from bench.units import mb_per_s
from bench.workdir import read_through


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass
class ServerInfo:
    series: str  # "ours", or "ours[LABEL]" for a candidate version
    code: str = "?"  # the directory the server's packages were imported from
    idle_rss_kib: int | None = None  # VmRSS before the first upload
    peak_rss_kib: int | None = None  # VmHWM after the last round
    sampled_peak_kib: int = 0  # the most VmRSS seen during the measured runs


@dataclass
class ScenarioResult:
    scenario: Scenario
    mbps: dict[str, list[float]] = field(default_factory=dict)  # series -> MB/s per round
    cpu: dict[str, list[CpuUse]] = field(default_factory=dict)  # contender -> per round
    servers: list[ServerInfo] = field(default_factory=list)  # ours first, then candidates

    def add(self, contender: Contender, sample: Sample) -> None:
        for series, seconds in sample.seconds.items():
            self.mbps.setdefault(series, []).append(mb_per_s(sample.nbytes, seconds))
        if sample.cpu is not None:
            self.cpu.setdefault(contender.name, []).append(sample.cpu)
        for server in self.servers:
            if server.series == contender.name:
                server.sampled_peak_kib = max(server.sampled_peak_kib, sample.peak_rss_kib)


def run_scenario(
    scenario: Scenario,
    ctx: Context,
    rounds: int,
    warmup: int = 1,
    log: Callable[[str], None] = _stderr,
) -> ScenarioResult:
    result = ScenarioResult(scenario)
    if scenario.single_run:
        rounds, warmup = 1, 0
    with ExitStack() as stack:
        ours, baselines = scenario.open(ctx, stack, scenario.name)
        contenders: list[Contender] = [*ours, *baselines]
        result.servers = [
            ServerInfo(o.name, o.server.code_location(), status_kib(o.server.pid, "VmRSS"))
            for o in ours
        ]
        for i in range(warmup):
            for contender in contenders:
                read_through(contender.source.path)
                sample = contender.run(f"warmup{i + 1}")
                log(f"{scenario.name} warm-up {i + 1}: {_figures(sample)}")
        for i in range(rounds):
            for contender in contenders:
                read_through(contender.source.path)
                sample = contender.run(f"r{i + 1}")
                result.add(contender, sample)
                log(f"{scenario.name} round {i + 1}/{rounds}: {_figures(sample)}")
        for info, upload in zip(result.servers, ours, strict=True):
            # VmHWM covers every moment; where the kernel does not keep it, what sampling saw.
            info.peak_rss_kib = upload.server.peak_rss_kib() or info.sampled_peak_kib or None
    return result


def _figures(sample: Sample) -> str:
    return ", ".join(
        f"{series} {mb_per_s(sample.nbytes, seconds):.0f} MB/s ({seconds:.2f}s)"
        for series, seconds in sample.seconds.items()
    )
