"""The web page (uploader/server/web/) in real headless Chromium, against a real server:
create, upload by the file input with a moving progress bar, an upload cut in the middle
and continued after a reload, and the token prompt with access control on.

Set `DVCR_SCREENSHOT_DIR` to keep a screenshot of the page (the README's is made so)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from flakyhttp import RequestCuttingProxy
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select
from serverproc import Server, free_port, manifest
from waiting import wait_until

from bench.chromium import CHROMEDRIVER, CHROMIUM, headless_chromium
from uploader.client.api_client import ApiClient
from uploader.client.credentials import Credentials
from uploader.resources import VIRTUAL_IMAGE

MiB = 1 << 20
# The PVC sink slowed down, so that a 64 MiB upload takes a few seconds to watch.
SLOW_SINK = {"DVCR_FAULT_SINK_BYTES_PER_SEC": str(24 * MiB)}


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    assert shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER), (
        "the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)"
    )
    driver = headless_chromium(tmp_path / "chromium")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(64 * MiB))
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def phase_in_table(driver: WebDriver, name: str) -> str | None:
    phase = driver.execute_script(
        "const row = document.querySelector(`#images tbody tr[data-name='${arguments[0]}']`);"
        "return row ? row.cells[1].textContent : null;",
        name,
    )
    return None if phase is None else str(phase)


def event_reasons(driver: WebDriver) -> list[str]:
    """The Reason column of the details' events table, top to bottom."""
    reasons = driver.execute_script(
        "return [...document.querySelectorAll('#events tbody tr')]"
        ".map((row) => row.cells[1].textContent);"
    )
    return [str(r) for r in reasons]


def open_image(driver: WebDriver, name: str) -> None:
    """Clicks the image's name in the table (which is drawn again on every change)."""

    def clicked() -> bool:
        try:
            driver.find_element(
                By.CSS_SELECTOR, f'#images tr[data-name="{name}"] .row-name'
            ).click()
        except (NoSuchElementException, StaleElementReferenceException):
            return False
        return True

    wait_until(clicked, what=f"{name} in the table")
    wait_until(lambda: driver.find_element(By.ID, "upload").is_displayed(), what="the upload form")


def start_upload(driver: WebDriver, file: Path) -> None:
    driver.find_element(By.ID, "file").send_keys(str(file))
    wait_until(lambda: driver.find_element(By.ID, "start").is_enabled(), what="Upload enabled")
    driver.find_element(By.ID, "start").click()


def progress_value(driver: WebDriver) -> float:
    return float(driver.find_element(By.ID, "upload-progress").get_attribute("value") or 0)


def screenshot(driver: WebDriver, name: str) -> None:
    directory = os.environ.get("DVCR_SCREENSHOT_DIR")
    if directory:
        driver.save_screenshot(str(Path(directory) / name))


def test_create_and_upload_through_the_page(browser: WebDriver, tmp_path: Path, disk: Path) -> None:
    with Server(tmp_path / "data", env=SLOW_SINK).start() as server:
        browser.get(server.url + "/")
        assert browser.title == "Virtual images"
        browser.find_element(By.ID, "create-name").send_keys("from-the-page")
        Select(browser.find_element(By.ID, "create-storage")).select_by_visible_text(
            "PersistentVolumeClaim"
        )
        browser.find_element(By.CSS_SELECTOR, "#create button[type=submit]").click()
        wait_until(
            lambda: phase_in_table(browser, "from-the-page") == "WaitForUserUpload",
            what="the new image waiting for its upload",
        )
        assert server.get("from-the-page")["spec"]["storage"] == "PersistentVolumeClaim"
        open_image(browser, "from-the-page")
        curl_line = browser.find_element(By.ID, "details-fields").text
        assert server.upload_url("from-the-page") in curl_line

        start_upload(browser, disk)
        seen: list[float] = []

        def moving() -> bool:
            value = progress_value(browser)
            if not seen or value != seen[-1]:
                seen.append(value)
            return any(0 < v < 100 for v in seen) and value > min(v for v in seen if v > 0)

        wait_until(moving, timeout=30, interval=0.05, what="the progress bar to move")
        assert re.search(r"MiB/s|KiB/s", browser.find_element(By.ID, "upload-status").text)
        screenshot(browser, "web-page-uploading.png")
        wait_until(
            lambda: phase_in_table(browser, "from-the-page") == "Ready",
            timeout=60,
            what="Ready in the table",
        )
        # The details show the image's events, newest first, as they come.
        wait_until(
            lambda: event_reasons(browser)[:1] == ["Ready"],
            what="the Ready event in the details",
        )
        assert event_reasons(browser)[:3] == ["Ready", "Provisioning", "WaitForUserUpload"]
        status = server.get("from-the-page")["status"]
        assert status["checksum"]["sha256"] == sha256(disk)
        assert (server.claim_dir("from-the-page") / "disk.img").read_bytes() == disk.read_bytes()


class ProxyThread:
    """A RequestCuttingProxy on an event loop of its own, beside a synchronous browser."""

    def __init__(self, proxy: RequestCuttingProxy) -> None:
        self.proxy = proxy
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> RequestCuttingProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.proxy.__aenter__(), self.loop).result(10)
        return self.proxy

    def __exit__(self, *exc: Any) -> None:
        asyncio.run_coroutine_threadsafe(self.proxy.__aexit__(None, None, None), self.loop).result(
            10
        )
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def test_a_cut_upload_continues_from_the_servers_offset_after_a_reload(
    browser: WebDriver, tmp_path: Path, disk: Path
) -> None:
    cut_after = 24 * MiB
    server = Server(tmp_path / "data", env=SLOW_SINK)
    with (
        ProxyThread(RequestCuttingProxy(server.port, [cut_after], settle=True)) as proxy,
        server,
    ):
        # The page and the upload URLs it is given, all through the proxy, as through an
        # ingress.
        page = f"http://127.0.0.1:{proxy.port}/"
        server.args = (*server.args, "--external-url", page.rstrip("/"))
        server.start()
        server.create(manifest("cut"))
        browser.get(page)
        open_image(browser, "cut")
        start_upload(browser, disk)
        wait_until(
            lambda: proxy.cut == 1,
            timeout=60,
            what=f"the proxy to cut the upload (it saw {proxy.requests})",
        )
        browser.refresh()  # the page is gone: what it knew is lost, the server's is not
        open_image(browser, "cut")
        sent_before = len(proxy.puts())
        start_upload(browser, disk)
        resumed = browser.find_element(By.ID, "upload-resumed")
        wait_until(lambda: resumed.text, timeout=30, what="the page to say where it went on")
        found = re.search(r"Continued at byte (\d+)", resumed.text)
        assert found, resumed.text
        offset = int(found.group(1))
        assert offset >= cut_after
        wait_until(lambda: phase_in_table(browser, "cut") == "Ready", timeout=60, what="Ready")
        ranges = proxy.puts()
        # (Chromium itself may send a cut PUT once more at once, from 0: the server refuses
        # it with the offset to continue at.)
        assert ranges[0] == f"bytes 0-{64 * MiB - 1}/{64 * MiB}"
        assert ranges[sent_before:] == [f"bytes {offset}-{64 * MiB - 1}/{64 * MiB}"], ranges
        assert server.get("cut")["status"]["checksum"]["sha256"] == sha256(disk)


def test_the_page_asks_for_a_token_and_shows_only_what_it_may_read(
    browser: WebDriver, tmp_path: Path
) -> None:
    tokens = tmp_path / "tokens.yaml"
    viewer = "team-a-viewer-token-0123456789"
    admin = "admin-token-0123456789abcdef"
    tokens.write_text(
        yaml.safe_dump(
            {
                "tokens": [
                    {"user": "vera", "token": viewer, "role": "view", "namespaces": ["team-a"]},
                    {"user": "ada", "token": admin, "role": "admin", "namespaces": "*"},
                ]
            }
        )
    )
    with Server(tmp_path / "data", "--api-token-file", str(tokens), token=admin).start() as server:
        for namespace, name in (("team-a", "visible"), ("team-b", "hidden")):
            server.call(
                "POST",
                f"/apis/virtualization.deckhouse.io/v1alpha2/namespaces/{namespace}/virtualimages",
                {**manifest(name), "metadata": {"name": name, "namespace": namespace}},
            )
        browser.get(server.url + "/")
        token_input = browser.find_element(By.ID, "token")
        wait_until(token_input.is_displayed, what="the token prompt")
        assert browser.switch_to.active_element == token_input
        token_input.send_keys("wrong-token-000000000000")
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()
        wait_until(
            lambda: "refused" in browser.find_element(By.ID, "token-problem").text,
            what="the wrong token refused",
        )
        token_input.send_keys(viewer)
        browser.find_element(By.CSS_SELECTOR, "#token-form button").click()

        namespace = browser.find_element(By.ID, "namespace")
        namespace.clear()
        namespace.send_keys("team-a")
        browser.find_element(By.CSS_SELECTOR, "#scope button").click()
        wait_until(lambda: phase_in_table(browser, "visible"), what="team-a's image")

        namespace.clear()
        namespace.send_keys("team-b")
        browser.find_element(By.CSS_SELECTOR, "#scope button").click()
        status = browser.find_element(By.ID, "list-status")
        wait_until(lambda: "forbidden" in status.text.lower(), what="team-b refused")
        assert phase_in_table(browser, "hidden") is None
        assert browser.find_elements(By.CSS_SELECTOR, "#images tbody tr") == []
        assert browser.execute_script("return sessionStorage.getItem('dvcr-token')") == viewer
        assert browser.execute_script("return localStorage.getItem('dvcr-token')") is None


def test_the_page_of_a_separate_api_listener_uploads_across_origins(
    browser: WebDriver, tmp_path: Path
) -> None:
    # The page comes from the API's listener; the upload URLs are the upload listener's,
    # another origin, so every part is a cross-origin request the upload URL must allow.
    disk = tmp_path / "small.img"
    disk.write_bytes(os.urandom(8 * MiB))
    api_port = free_port()
    api_url = f"http://127.0.0.1:{api_port}"
    with Server(tmp_path / "data", "--api-listen", f"127.0.0.1:{api_port}").start() as server:
        api = ApiClient(api_url, Credentials(None))
        code, _ = api.call("POST", api.path(VIRTUAL_IMAGE, "default", None), manifest("across"))
        assert code == 201
        browser.get(api_url + "/")
        open_image(browser, "across")
        upload_url = api.wait_for_phase("across", ("WaitForUserUpload",), 20, "default")["status"][
            "imageUploadURLs"
        ]["external"]
        assert upload_url.startswith(server.url + "/upload/")
        start_upload(browser, disk)
        wait_until(
            lambda: phase_in_table(browser, "across") == "Ready",
            timeout=60,
            what="Ready in the table",
        )
        status = api.wait_for_phase("across", ("Ready",), 20, "default")["status"]
        assert status["checksum"]["sha256"] == sha256(disk)
