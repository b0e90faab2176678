"""One upload through the web page in headless Chromium, against `curl -T` of the same
file in the same run, into PVC images of one server.

    python -m bench.browser_upload [--size MIB] [--rounds N]

Each round uploads the file once by the page (file input, Upload, until the table shows
Ready) and once by `curl -T` (until the image is Ready), alternating, and prints each
one's MB/s and their ratio (target: the page at least 0.7x curl). Needs Debian's chromium
and chromium-driver, and selenium.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.common.by import By

from bench.chromium import headless_chromium
from bench.ours import OurServer
from uploader.client.api_client import phase
from uploader.resources import VIRTUAL_IMAGE

MiB = 1 << 20


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


def by_curl(server: OurServer, name: str, file: Path) -> float:
    url = server.create_upload(name)
    started = time.monotonic()
    subprocess.run(["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(file), url], check=True)
    _wait_ready(server, name)
    return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.browser_upload", description=__doc__)
    parser.add_argument("--size", type=int, default=1024, help="MiB (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="browser-upload-") as tmp:
        work = Path(tmp)
        file = work / "disk.img"
        with file.open("wb") as f:
            block = os.urandom(MiB)
            for i in range(args.size):
                f.write(block[i % 251 :] + block[: i % 251])
        server = OurServer(work / "data").start()
        driver = headless_chromium(work / "chromium")
        page: list[float] = []
        curl: list[float] = []
        try:
            for round_ in range(args.rounds):
                page.append(args.size * MiB / by_page(driver, server, f"page-{round_}", file) / 1e6)
                curl.append(args.size * MiB / by_curl(server, f"curl-{round_}", file) / 1e6)
                print(f"round {round_ + 1}: page {page[-1]:.0f} MB/s, curl -T {curl[-1]:.0f} MB/s")
        finally:
            driver.quit()
            server.stop()
    ratio = statistics.median(page) / statistics.median(curl)
    print(
        f"median: page {statistics.median(page):.0f} MB/s, curl -T "
        f"{statistics.median(curl):.0f} MB/s, ratio {ratio:.2f} (target >= 0.70)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
