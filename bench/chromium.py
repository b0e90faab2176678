"""Debian's Chromium, headless, driven by selenium: for the web page's tests and bench.

The flags keep it off the network it would otherwise reach for (updates, sync, QUIC), and
the profile is a new empty directory each time. None of them changes how a page's upload
travels: that is Chromium's own path (bench/README.md, "Uploads from the web page").
"""

from __future__ import annotations

import os
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1200,900",
)
# Which process of Chromium does what, by the switches it was started with.
_ROLES = (
    ("--utility-sub-type=network.mojom.NetworkService", "network"),
    ("--type=renderer", "renderer"),
    ("--type=gpu-process", "gpu"),
    ("--type=", "other"),
)


def headless_chromium(profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))


def _command_line(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return raw.decode(errors="replace").split("\0")


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[1])


def chromium_processes(profile: Path) -> dict[int, str]:
    """The live processes of the Chromium started with `profile`, by pid, each with its
    role: "browser" (the one that reads files for uploads), "network" (the network
    service, which writes the request bodies to the socket), "renderer", "gpu", "other"."""
    pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    profile_switch = f"--user-data-dir={profile}"
    browser = next(
        (
            pid
            for pid in pids
            if profile_switch in (argv := _command_line(pid))
            and not any(a.startswith("--type=") for a in argv)
        ),
        None,
    )
    if browser is None:
        return {}
    parents = {pid: _parent(pid) for pid in pids}
    roles = {browser: "browser"}
    grown = True
    while grown:  # descendants, through the zygotes
        grown = False
        for pid, parent in parents.items():
            if pid not in roles and parent in roles:
                switches = " ".join(_command_line(pid))
                roles[pid] = next((role for mark, role in _ROLES if mark in switches), "other")
                grown = True
    return roles
