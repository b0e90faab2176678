"""One upload through the web page in headless Chromium, against `curl -T` of the same
file in the same run, into PVC images of one server.

    python -m bench.browser_upload [--size MIB] [--rounds N]

Each round uploads the file once by the page (file input, Upload, until the image is
Ready) and once by `curl -T` (until the image is Ready), alternating, and prints each
one's MB/s, their ratio (target: the page at least 0.7x curl), and the CPU seconds each
process spent per GiB, with the seconds it was ready to run but waited for a CPU: for the
page Chromium's browser process, its network service, renderers and GPU process, and our
server; for curl, curl and our server. Needs Debian's chromium and chromium-driver, and
selenium.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By

from bench.chromium import chromium_processes, headless_chromium
from bench.ours import OurServer
from bench.procstat import thread_times
from uploader.client.api_client import phase
from uploader.resources import VIRTUAL_IMAGE

MiB = 1 << 20
GiB = 1 << 30
TARGET = 0.70


@dataclass(frozen=True)
class Times:
    """CPU seconds, and seconds runnable but waiting for a CPU, of a group of processes."""

    cpu: float = 0.0
    wait: float = 0.0

    def __add__(self, other: Times) -> Times:
        return Times(self.cpu + other.cpu, self.wait + other.wait)

    def __sub__(self, other: Times) -> Times:
        return Times(self.cpu - other.cpu, self.wait - other.wait)


def process_times(pid: int) -> Times:
    threads = thread_times(pid).values()
    return Times(sum(t.cpu for t in threads), sum(t.wait for t in threads))


def role_times(roles: Mapping[int, str]) -> dict[str, Times]:
    """Times of every process in `roles`, summed by role."""
    totals: dict[str, Times] = {}
    for pid, role in roles.items():
        totals[role] = totals.get(role, Times()) + process_times(pid)
    return totals


@dataclass(frozen=True)
class Run:
    mb_s: float
    per_gib: dict[str, Times]  # by role, per GiB sent

    def describe(self) -> str:
        parts = (
            f"{role} {t.cpu:.1f} ({t.wait:.1f})"
            for role, t in sorted(self.per_gib.items(), key=lambda item: -item[1].cpu)
            if t.cpu >= 0.05
        )
        return f"{self.mb_s:.0f} MB/s; CPU s per GiB (waiting for a CPU): " + ", ".join(parts)


def measured(
    size: int,
    roles: Callable[[], Mapping[int, str]],
    upload: Callable[[], float],
    ended: Callable[[], dict[str, Times]] = dict,
) -> Run:
    """Runs `upload` (it returns its seconds) between two readings of the times of the
    processes `roles` names then; `ended` adds the times of processes that ended in it."""
    before_roles = roles()
    before = role_times(before_roles)
    seconds = upload()
    after = role_times({pid: r for pid, r in roles().items() if pid in before_roles})
    spent = {role: t - before[role] for role, t in after.items()} | ended()
    scale = GiB / size
    per_gib = {role: Times(t.cpu * scale, t.wait * scale) for role, t in spent.items()}
    return Run(size / seconds / 1e6, per_gib)


def _wait_ready(server: OurServer, name: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while phase(server.api.get(VIRTUAL_IMAGE, server.namespace, name)) != "Ready":
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not Ready within {timeout:g} s")
        time.sleep(0.05)


def by_page(driver: webdriver.Chrome, server: OurServer, name: str, file: Path) -> float:
    server.create_upload(name)
    driver.get(server.url + "/")
    deadline = time.monotonic() + 30
    while True:
        buttons = driver.find_elements(By.CSS_SELECTOR, f'#images tr[data-name="{name}"] button')
        if buttons:
            buttons[0].click()
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the image did not appear on the page")
        time.sleep(0.05)
    driver.find_element(By.ID, "file").send_keys(str(file))
    started = time.monotonic()
    driver.find_element(By.ID, "start").click()
    _wait_ready(server, name)
    return time.monotonic() - started


class Curl:
    """`curl -T`, with the CPU time it used (from its exit: it ends within the run)."""

    def __init__(self) -> None:
        self.times = Times()

    def upload(self, server: OurServer, name: str, file: Path) -> float:
        url = server.create_upload(name)
        started = time.monotonic()
        argv = ["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(file), url]
        process = subprocess.Popen(argv)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            raise RuntimeError(f"curl -T failed with {process.returncode}")
        self.times = Times(usage.ru_utime + usage.ru_stime)
        _wait_ready(server, name)
        return time.monotonic() - started


def make_file(path: Path, size: int) -> None:
    with path.open("wb") as f:
        block = os.urandom(MiB)
        for i in range(size // MiB):
            f.write(block[i % 251 :] + block[: i % 251])


def one_round(
    index: int, driver: webdriver.Chrome, profile: Path, server: OurServer, file: Path
) -> tuple[Run, Run]:
    """The page's upload, then curl's, each into a new image."""
    size = file.stat().st_size
    page = measured(
        size,
        lambda: {**chromium_processes(profile), server.pid: "server"},
        lambda: by_page(driver, server, f"page-{index}", file),
    )
    server.delete(f"page-{index}")
    curl = Curl()
    by_curl = measured(
        size,
        lambda: {server.pid: "server"},
        lambda: curl.upload(server, f"curl-{index}", file),
        lambda: {"curl": curl.times},
    )
    server.delete(f"curl-{index}")
    return page, by_curl


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.browser_upload", description=__doc__)
    parser.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.size * MiB
    with tempfile.TemporaryDirectory(prefix="browser-upload-") as tmp:
        work = Path(tmp)
        file = work / "disk.img"
        make_file(file, size)
        server = OurServer(work / "data").start()
        profile = work / "chromium"
        driver = headless_chromium(profile)
        page: list[Run] = []
        curl: list[Run] = []
        try:
            for round_ in range(args.rounds):
                by_page_run, by_curl_run = one_round(round_, driver, profile, server, file)
                page.append(by_page_run)
                curl.append(by_curl_run)
                print(f"round {round_ + 1}: page {page[-1].describe()}")
                print(f"         curl -T {curl[-1].describe()}", flush=True)
        finally:
            driver.quit()
            server.stop()
    page_mb_s = statistics.median(r.mb_s for r in page)
    curl_mb_s = statistics.median(r.mb_s for r in curl)
    print(
        f"median: page {page_mb_s:.0f} MB/s, curl -T {curl_mb_s:.0f} MB/s, ratio "
        f"{page_mb_s / curl_mb_s:.2f} (target >= {TARGET:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
