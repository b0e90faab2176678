"""`python -m bench.resume`: what resuming costs, and what 32 uploads at once cost.

Not one of `python -m bench`'s scenarios (there is no baseline to set it against); it
prints its own figures:

(a) Resume overhead. A `curl -T` of `--size` bytes is killed once its upload is at
    `--cut-at` of the way; the client then does what a person or `dvcr-uploader upload`
    does: `HEAD` for the offset, `curl -C OFFSET -T`. Measured: the time from the kill to
    the first byte the server takes again (a `HEAD` poll every 2 ms sees the offset move),
    split into the `HEAD` answer and the rest, and the wall time of the whole cut upload
    against an uncut one of the same file (the ratio). Rounds alternate uncut and cut.
(b) Peak server memory (VmHWM) with `--concurrent` uploads of `--concurrent-size` bytes
    each, all at once at full speed, on a freshly started server; and their aggregate
    throughput.
(c) The throughput of one upload at full speed alone, against the same upload while
    `--concurrent` - 1 others run, each held to `--others-rate` by curl's --limit-rate.
(d) Server memory (VmRSS) while `--concurrent` uploads wait to be continued: each sent
    half of `--concurrent-size` at full speed, all at once, and its curl was killed.

Every upload's answer is checked (200, Ready, the sha256 of the file). Like `python -m
bench` it runs the server of this checkout, keeps everything in one directory on a disk
(`--tmp-dir`), and removes it at the end (unless `--keep`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench import machine
from bench.curl import curl_binary
from bench.ours import OurServer
from bench.units import MiB, format_size, mb_per_s, parse_size
from bench.workdir import SourceFile, make_workdir, random_file, read_through, settle

CHECKOUT = Path(__file__).resolve().parent.parent
STORAGES = {"pvc": "PersistentVolumeClaim", "dvcr": "ContainerRegistry"}


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _server_env() -> dict[str, str]:
    """The server measured is the code next to bench/, whatever is installed."""
    rest = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{CHECKOUT}{os.pathsep}{rest}" if rest else str(CHECKOUT)}


# -- one upload -------------------------------------------------------------------------------


class UploadFailed(RuntimeError):
    pass


@dataclass
class Answer:
    code: int
    seconds: float  # curl's time_total
    body: dict[str, Any]


def _curl_argv(path: Path, url: str, *extra: str) -> list[str]:
    return [
        curl_binary(),
        "-sS",
        "-o",
        "-",
        "-w",
        "\n%{http_code} %{time_total}",
        *extra,
        "-T",
        str(path),
        url,
    ]


def start_upload(path: Path, url: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        _curl_argv(path, url, *extra), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def finish_upload(proc: subprocess.Popen[bytes], timeout: float = 3600) -> Answer:
    out, _ = proc.communicate(timeout=timeout)
    text, _, tail = out.decode(errors="replace").rpartition("\n")
    code, seconds = tail.split() if tail.strip() else ("0", "0")
    body: dict[str, Any] = {}
    if text.strip().startswith("{"):
        try:
            body = json.loads(text)
        except ValueError:
            body = {}
    return Answer(int(code), float(seconds), body)


def check_ready(answer: Answer, source: SourceFile, what: str) -> None:
    checksum = (answer.body.get("checksum") or {}).get("sha256")
    if answer.code != 200 or answer.body.get("phase") != "Ready" or checksum != source.sha256:
        raise UploadFailed(f"{what}: {answer.code} {answer.body}")


class OffsetProbe:
    """HEAD on an upload URL over one kept-alive connection."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.path = parts.path
        self.conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=30)

    def offset(self) -> int:
        self.conn.request("HEAD", self.path)
        response = self.conn.getresponse()
        response.read()
        if response.status != 200:
            raise UploadFailed(f"HEAD {self.path}: {response.status}")
        return int(response.headers["Upload-Offset"])

    def close(self) -> None:
        self.conn.close()


# -- (a) resume overhead ---------------------------------------------------------------------


@dataclass
class CutRun:
    cut_offset: int  # where the server stood when the client was killed
    resumed_at: int  # the offset HEAD gave
    head_ms: float  # from the kill until the first HEAD answered
    first_byte_ms: float  # from the kill until the server took a byte of the resumed request
    retries: int  # resumed requests refused (409/416: the server still read the old one)
    total_s: float  # the whole cut upload, first byte of the first curl to the answer


def uncut_run(server: OurServer, source: SourceFile, name: str, storage: str) -> float:
    url = server.create_upload(name, storage)
    read_through(source.path)
    started = time.perf_counter()
    answer = finish_upload(start_upload(source.path, url))
    seconds = time.perf_counter() - started
    check_ready(answer, source, f"uncut upload {name}")
    server.delete(name)
    settle()
    return seconds


def cut_run(
    server: OurServer, source: SourceFile, name: str, storage: str, cut_at: float
) -> CutRun:
    url = server.create_upload(name, storage)
    read_through(source.path)
    probe = OffsetProbe(url)
    try:
        started = time.perf_counter()
        first = start_upload(source.path, url)
        while (offset := probe.offset()) < cut_at * source.size:
            if first.poll() is not None:
                raise UploadFailed(f"{name}: the upload ended before the cut; use a larger --size")
            time.sleep(0.002)
        first.kill()
        cut = time.perf_counter()
        first.communicate()

        retries = 0
        head_ms = None
        while True:
            resumed_at = probe.offset()
            if head_ms is None:
                head_ms = (time.perf_counter() - cut) * 1000
            proc = start_upload(source.path, url, "-C", str(resumed_at))
            taken = None
            while taken is None and proc.poll() is None:
                if probe.offset() > resumed_at:
                    taken = time.perf_counter()
                else:
                    time.sleep(0.002)
            answer = finish_upload(proc)
            if answer.code in (409, 416):
                # The server was still taking what the killed client had sent (409), or
                # took more after the HEAD (416): ask again, as a client does.
                retries += 1
                time.sleep(0.01)
                continue
            break
        total = time.perf_counter() - started
        check_ready(answer, source, f"resumed upload {name}")
        if taken is None:
            raise UploadFailed(f"{name}: the resumed request ended before a poll saw it")
    finally:
        probe.close()
    server.delete(name)
    settle()
    return CutRun(offset, resumed_at, head_ms, (taken - cut) * 1000, retries, total)


# -- (b) and (c): many at once ---------------------------------------------------------------


@dataclass
class ManyRun:
    uploads: int
    seconds: float  # from the first start to the last answer
    aggregate_mbps: float
    per_upload_mbps: list[float]  # each upload's own size / curl's time_total
    idle_rss_mib: float
    peak_rss_mib: float  # VmHWM of a server started for this run


@contextlib.contextmanager
def crowd(
    workdir: Path, name: str, count: int, storage: str, env: dict[str, str]
) -> Iterator[tuple[OurServer, list[str], float]]:
    """A freshly started server with `count` images waiting for an upload: the server,
    their upload URLs, and its RSS (MiB) before any upload. Everything goes at the end."""
    with OurServer(workdir / name, env=env) as server:
        urls = [server.create_upload(f"{name}-{i}", storage) for i in range(count)]
        yield server, urls, (server.rss_kib() or 0) / 1024
        for i in range(count):
            server.delete(f"{name}-{i}")
    shutil.rmtree(workdir / name, ignore_errors=True)
    settle()


def many_at_once(
    workdir: Path, source: SourceFile, count: int, storage: str, env: dict[str, str]
) -> ManyRun:
    with crowd(workdir, "many", count, storage, env) as (server, urls, idle):
        read_through(source.path)
        started = time.perf_counter()
        procs = [start_upload(source.path, url) for url in urls]
        answers = [finish_upload(p) for p in procs]
        seconds = time.perf_counter() - started
        for i, answer in enumerate(answers):
            check_ready(answer, source, f"many-{i}")
        peak = (server.peak_rss_kib() or 0) / 1024
    return ManyRun(
        count,
        seconds,
        mb_per_s(count * source.size, seconds),
        [mb_per_s(source.size, a.seconds) for a in answers],
        idle,
        peak,
    )


@dataclass
class OneAmongMany:
    alone_mbps: list[float] = field(default_factory=list)
    among_mbps: list[float] = field(default_factory=list)
    others: int = 0
    others_rate: str = ""
    peak_rss_mib: float = 0.0


def one_among_many(
    workdir: Path,
    source: SourceFile,
    others: int,
    others_rate: str,
    rounds: int,
    storage: str,
    env: dict[str, str],
) -> OneAmongMany:
    result = OneAmongMany(others=others, others_rate=others_rate)
    with OurServer(workdir / "one", env=env) as server:
        for r in range(rounds):
            url = server.create_upload(f"alone-{r}", storage)
            read_through(source.path)
            answer = finish_upload(start_upload(source.path, url))
            check_ready(answer, source, "alone")
            result.alone_mbps.append(mb_per_s(source.size, answer.seconds))
            server.delete(f"alone-{r}")
            settle()

            background = []
            for i in range(others):
                other_url = server.create_upload(f"other-{r}-{i}", storage)
                background.append(start_upload(source.path, other_url, "--limit-rate", others_rate))
            try:
                time.sleep(1.0)  # every other upload is under way
                if any(p.poll() is not None for p in background):
                    raise UploadFailed("a background upload ended early; lower --others-rate")
                url = server.create_upload(f"among-{r}", storage)
                answer = finish_upload(start_upload(source.path, url))
                check_ready(answer, source, "among others")
                result.among_mbps.append(mb_per_s(source.size, answer.seconds))
                if any(p.poll() is not None for p in background):
                    raise UploadFailed("a background upload ended before the measured one")
            finally:
                for p in background:
                    p.kill()
                    p.communicate()
            server.delete(f"among-{r}")
            for i in range(others):
                server.delete(f"other-{r}-{i}")
            settle()
        result.peak_rss_mib = (server.peak_rss_kib() or 0) / 1024
    shutil.rmtree(workdir / "one", ignore_errors=True)
    return result


@dataclass
class WaitingRun:
    uploads: int
    idle_rss_mib: float
    sending_peak_rss_mib: float  # VmHWM while they sent
    waiting_rss_mib: float  # VmRSS a few seconds after the last curl was killed


def waiting_to_continue(
    workdir: Path, source: SourceFile, count: int, storage: str, env: dict[str, str]
) -> WaitingRun:
    with crowd(workdir, "waiting", count, storage, env) as (server, urls, idle):
        read_through(source.path)
        procs = [start_upload(source.path, url) for url in urls]
        probes = [OffsetProbe(url) for url in urls]
        try:
            sending = dict(zip(procs, probes, strict=True))
            while sending:
                for proc, probe in list(sending.items()):
                    if probe.offset() >= source.size // 2:
                        proc.kill()
                        proc.communicate()
                        del sending[proc]
                    elif proc.poll() is not None:
                        raise UploadFailed("an upload ended before its cut")
                time.sleep(0.005)
        finally:
            for proc in procs:
                proc.kill()
            for probe in probes:
                probe.close()
        peak = (server.peak_rss_kib() or 0) / 1024
        time.sleep(3.0)  # long enough for every transfer to notice it waits
        waiting = (server.rss_kib() or 0) / 1024
    return WaitingRun(count, idle, peak, waiting)


# -- the command ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench.resume",
        description="Resume overhead, and many uploads at once (memory and throughput).",
    )
    parser.add_argument("--size", type=_size, default=parse_size("1GiB"), help="(a): 1GiB")
    parser.add_argument("--cut-at", type=float, default=0.5, help="(a): where to cut, 0.5")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (a) and (c): 3")
    parser.add_argument("--concurrent", type=int, default=32, help="(b)-(d): 32 uploads")
    parser.add_argument(
        "--concurrent-size", type=_size, default=parse_size("64MiB"), help="(b)-(d): 64MiB"
    )
    parser.add_argument(
        "--others-rate", default="2M", help="(c): curl --limit-rate of the others, 2M"
    )
    parser.add_argument("--storage", choices=sorted(STORAGES), default="pvc", help="pvc")
    parser.add_argument("--tmp-dir", type=Path, help="where the run's directory is made")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    return parser


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.cut_at < 1 or args.rounds < 1 or args.concurrent < 2:
        print("--cut-at must be in (0, 1), --rounds >= 1, --concurrent >= 2", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    needed = 3 * args.size + (args.concurrent + 2) * args.concurrent_size + 256 * MiB
    workdir = make_workdir(args.tmp_dir, needed=needed)
    try:
        return _run(args, workdir)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values):.0f} ms (min {min(values):.0f}, max {max(values):.0f})"


def _run(args: argparse.Namespace, workdir: Path) -> int:
    started = time.monotonic()
    env = _server_env()
    storage = STORAGES[args.storage]
    _log(f"generating {format_size(args.size)} and {format_size(args.concurrent_size)}")
    big = random_file(workdir / "big.raw", args.size)
    small = random_file(workdir / "small.raw", args.concurrent_size)
    settle()

    uncut: list[float] = []
    cuts: list[CutRun] = []
    with OurServer(workdir / "resume", env=env) as server:
        for r in range(args.rounds):
            uncut.append(uncut_run(server, big, f"uncut-{r}", storage))
            cuts.append(cut_run(server, big, f"cut-{r}", storage, args.cut_at))
            c = cuts[-1]
            _log(
                f"(a) round {r + 1}/{args.rounds}: uncut {uncut[-1]:.2f} s, cut {c.total_s:.2f} s; "
                f"cut at {format_size(c.cut_offset)}, HEAD {c.head_ms:.1f} ms, first byte "
                f"{c.first_byte_ms:.1f} ms, {c.retries} refused"
            )
    shutil.rmtree(workdir / "resume", ignore_errors=True)

    _log(f"(b) {args.concurrent} uploads of {format_size(args.concurrent_size)} at once")
    many = many_at_once(workdir, small, args.concurrent, storage, env)
    _log(f"(c) one upload alone, and among {args.concurrent - 1} at {args.others_rate}/s each")
    among = one_among_many(
        workdir, small, args.concurrent - 1, args.others_rate, args.rounds, storage, env
    )
    _log(f"(d) {args.concurrent} uploads cut halfway, waiting to be continued")
    waiting = waiting_to_continue(workdir, small, args.concurrent, storage, env)

    meta = machine.describe(workdir)
    ratio = statistics.median(c.total_s for c in cuts) / statistics.median(uncut)
    alone = statistics.median(among.alone_mbps)
    crowded = statistics.median(among.among_mbps)
    print()
    print(
        f"{meta['date']}; storage {storage}; nproc {meta['nproc']}, {meta['cpu']}, "
        f"{meta['memory']} RAM; disk {meta['disk']}; medians of {args.rounds} rounds"
    )
    print()
    print(f"(a) resume, {format_size(args.size)} cut once at {args.cut_at:.0%} (curl killed)")
    print(f"    kill -> HEAD answered:            {_ms([c.head_ms for c in cuts])}")
    print(f"    kill -> first byte taken again:   {_ms([c.first_byte_ms for c in cuts])}")
    print(f"    resumed requests refused:         {sum(c.retries for c in cuts)}")
    print(
        f"    whole upload: uncut {statistics.median(uncut):.2f} s, cut once "
        f"{statistics.median(c.total_s for c in cuts):.2f} s, ratio {ratio:.3f}"
    )
    per = many.per_upload_mbps
    print(f"(b) {many.uploads} uploads of {format_size(args.concurrent_size)} at once, full speed")
    print(
        f"    server peak RSS {many.peak_rss_mib:.0f} MiB (idle {many.idle_rss_mib:.0f} MiB); "
        f"{many.seconds:.1f} s, aggregate {many.aggregate_mbps:.0f} MB/s; per upload median "
        f"{statistics.median(per):.1f} MB/s (min {min(per):.1f}, max {max(per):.1f})"
    )
    print(
        f"(c) one upload of {format_size(args.concurrent_size)}: alone {alone:.0f} MB/s; "
        f"while {among.others} others run at {among.others_rate}/s each {crowded:.0f} MB/s "
        f"(ratio {crowded / alone:.2f}); server peak RSS {among.peak_rss_mib:.0f} MiB"
    )
    print(
        f"(d) {waiting.uploads} uploads cut halfway, waiting to be continued: server RSS "
        f"{waiting.waiting_rss_mib:.0f} MiB (idle {waiting.idle_rss_mib:.0f} MiB; peak "
        f"{waiting.sending_peak_rss_mib:.0f} MiB while they sent)"
    )
    print(f"\n(total {time.monotonic() - started:.0f}s)")
    if args.json:
        figures = {
            "meta": meta,
            "storage": storage,
            "size": args.size,
            "cut_at": args.cut_at,
            "uncut_s": uncut,
            "cuts": [asdict(c) for c in cuts],
            "cut_ratio": ratio,
            "many": asdict(many),
            "one_among_many": asdict(among),
            "waiting": asdict(waiting),
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
