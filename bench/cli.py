"""`python -m bench`: run the scenarios and print the table."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType

from bench import machine, report
from bench.runner import ScenarioResult, run_scenario
from bench.scenarios import SCENARIOS, Context
from bench.units import MiB, format_size, parse_size
from bench.workdir import make_workdir, random_file, settle


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scenarios(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown scenario {', '.join(unknown)}; known: {', '.join(SCENARIOS)}"
        )
    return names


# The server measured is the one in the checkout that holds this harness, whatever else
# is installed: its directory goes first on our server's PYTHONPATH.
CHECKOUT = Path(__file__).resolve().parent.parent


def _pythonpath(first: Path) -> str:
    rest = os.environ.get("PYTHONPATH", "")
    return f"{first}{os.pathsep}{rest}" if rest else str(first)


def _env(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {"PYTHONPATH": _pythonpath(CHECKOUT)}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--ours-env {pair!r}: expected NAME=VALUE")
        env[name] = value
    return env


def _candidates(pairs: list[str]) -> dict[str, dict[str, str]]:
    candidates: dict[str, dict[str, str]] = {}
    for pair in pairs:
        label, sep, path = pair.partition("=")
        if not sep or not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,15}", label):
            raise SystemExit(f"--candidate {pair!r}: expected LABEL=PATH, LABEL like v2 or fix-1")
        if not (Path(path) / "uploader").is_dir():
            raise SystemExit(f"--candidate {pair!r}: {path} has no uploader/ package")
        candidates[label] = {"PYTHONPATH": _pythonpath(Path(path).resolve())}
    return candidates


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Our server against its baselines, side by side, interleaved rounds.",
    )
    parser.add_argument("--size", type=_size, default=parse_size("2GiB"), help="default 2GiB")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    parser.add_argument(
        "--scenarios",
        type=_scenarios,
        default=list(SCENARIOS),
        help=f"comma-separated, default all: {','.join(SCENARIOS)}",
    )
    parser.add_argument(
        "--tmp-dir",
        type=Path,
        help="where the run's directory is made (default: the system temp dir unless it "
        "is in RAM, else the current directory); it must be on the disk to measure",
    )
    parser.add_argument(
        "--ours-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="set in our server's environment (repeatable); by default its PYTHONPATH "
        "starts with this checkout, so the server measured is the code next to bench/",
    )
    parser.add_argument(
        "--candidate",
        action="append",
        default=[],
        metavar="LABEL=PATH",
        help="also run the server from another checkout at PATH (its importer/ and "
        "uploader/ go first on PYTHONPATH) in the same rounds; repeatable. Shows what a "
        "change buys, side by side with the current code and the same baselines",
    )
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is not met")
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    return parser


def _disk_needed(names: list[str], size: int) -> int:
    """The source, what the scenarios keep, and the most any one needs at once."""
    scenarios = [SCENARIOS[name] for name in names]
    factor = 1 + sum(s.keeps for s in scenarios) + max((s.disk for s in scenarios), default=0)
    return int(factor * size) + 256 * MiB


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every finally: servers stop, files go


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        for scenario in SCENARIOS.values():
            print(f"{scenario.name}: {scenario.description}")
        return 0
    if args.rounds < 1:
        print("--rounds must be at least 1", file=sys.stderr)
        return 2
    ours_env = _env(args.ours_env)
    candidates = _candidates(args.candidate)
    signal.signal(signal.SIGTERM, _terminate)
    workdir = make_workdir(args.tmp_dir, needed=_disk_needed(args.scenarios, args.size))
    try:
        return _run(args, workdir, ours_env, candidates)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(
    args: argparse.Namespace,
    workdir: Path,
    ours_env: dict[str, str],
    candidates: dict[str, dict[str, str]],
) -> int:
    started = time.monotonic()
    print(f"generating {format_size(args.size)} of random data in {workdir}", file=sys.stderr)
    source = random_file(workdir / "source.raw", args.size)
    settle()
    ctx = Context(workdir, source, ours_env, candidates)
    results: list[ScenarioResult] = []
    for name in args.scenarios:
        results.append(run_scenario(SCENARIOS[name], ctx, args.rounds, args.warmup))
    meta = machine.describe(workdir)
    meta.update(size=format_size(args.size), rounds=str(args.rounds), warmup=str(args.warmup))
    print()
    print(
        f"{meta['date']}; {format_size(args.size)}, {args.rounds} rounds (+{args.warmup} "
        f"warm-up); nproc {meta['nproc']}, {meta['cpu']}, {meta['memory']} RAM; "
        f"disk {meta['disk']}"
    )
    print("MB/s = 10^6 bytes/s of the file sent, median over rounds; ratio = ours / baseline;")
    print("nginx PUT: until nginx answers (no fsync), nginx PUT+fsync: until the file is also")
    print("fsynced; imageio PUT: until ovirt-imageio answers (it flushes first). A time target")
    print("(our time at most X of theirs) is shown as the least ratio, 1/X.")
    print()
    table_rows = report.rows(results)
    print(report.table(table_rows))
    print()
    print(report.details(results))
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps(report.as_json(results, meta), indent=2) + "\n")
    if args.check and any(r.met is False for r in table_rows):
        return 1
    return 0
