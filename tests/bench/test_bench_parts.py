"""Parts of the benchmark harness that need no server: the table's targets, the throttling
proxy, the compressible data."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import ExitStack

import pytest
import zstandard

from bench.compressible import BLOCK, block
from bench.contenders import Contender, OurContender
from bench.report import rows, table
from bench.runner import ScenarioResult, ServerInfo
from bench.scenarios import Comparison, Context, Scenario
from bench.slowproxy import ThrottledProxy

pytestmark = pytest.mark.timeout(60)


def _never_opened(
    ctx: Context, stack: ExitStack, name: str
) -> tuple[list[OurContender], list[Contender]]:
    raise AssertionError("not run here")


def _result(scenario: Scenario, peak_mib: int, mbps: dict[str, list[float]]) -> ScenarioResult:
    result = ScenarioResult(scenario, mbps=mbps)
    result.servers = [ServerInfo("ours", peak_rss_kib=peak_mib * 1024)]
    return result


def test_a_memory_target_without_a_baseline_is_one_row() -> None:
    scenario = Scenario("slow", "", (), _never_opened, max_rss_mib=128, single_run=True)
    (within,) = rows([_result(scenario, 100, {"ours": [50.0]})])
    assert within.baseline is None and within.ratio is None and within.met is True
    assert "| -" in table([within]) and "RSS <= 128 MiB" in table([within])
    (over,) = rows([_result(scenario, 129, {"ours": [50.0]})])
    assert over.met is False


def test_a_baseline_that_could_not_run_leaves_its_row_out() -> None:
    scenario = Scenario(
        "raw",
        "",
        (Comparison("nginx PUT", 1.0), Comparison("imageio PUT", 1.0)),
        _never_opened,
    )
    (row,) = rows([_result(scenario, 60, {"ours": [90.0], "nginx PUT": [100.0]})])
    assert row.baseline == "nginx PUT" and row.ratio == pytest.approx(0.9) and row.met is False


def test_the_proxy_holds_the_upstream_direction_to_its_rate() -> None:
    upstream = socket.create_server(("127.0.0.1", 0))
    received = bytearray()

    def sink() -> None:
        conn, _ = upstream.accept()
        while data := conn.recv(1 << 20):
            received.extend(data)
        conn.sendall(b"done")
        conn.close()

    thread = threading.Thread(target=sink)
    thread.start()
    size, rate = 4 << 20, 20e6
    with ThrottledProxy(upstream.getsockname()[1], rate) as proxy:
        client = socket.create_connection(("127.0.0.1", proxy.port))
        started = time.perf_counter()
        client.sendall(bytes(size))
        client.shutdown(socket.SHUT_WR)
        assert client.recv(16) == b"done"  # the answer comes back through the proxy
        seconds = time.perf_counter() - started
        client.close()
    thread.join()
    upstream.close()
    assert len(received) == size
    assert seconds >= 0.9 * size / rate


def test_the_compressible_data_compresses_about_like_a_disk_image() -> None:
    data = b"".join(block(i) for i in range(64))
    assert data == b"".join(block(i) for i in range(64))  # the same seed, the same bytes
    ratio = len(data) / len(zstandard.ZstdCompressor().compress(data))
    assert 2 <= ratio <= 4, ratio
    assert len(data) == 64 * BLOCK
