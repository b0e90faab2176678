"""A body refused halfway: the sender still gets the answer, not a reset connection.

The client here keeps sending after the server refused the body, as curl does while its
file is still going out, and reads the answer only once it has sent what it meant to.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

from serverproc import Server, manifest

MiB = 1 << 20


def invalid_qcow2(tmp_path: Path) -> bytes:
    """A real qcow2 whose L1 table claims 2^30 entries: refused from its header."""
    path = tmp_path / "bad.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "1G"], check=True)
    data = bytearray(path.read_bytes())
    struct.pack_into(">I", data, 36, 1 << 30)
    return bytes(data)


def refused_put(url: str, head_of_body: bytes, declared: int, sent_after: int) -> bytes:
    """PUTs `head_of_body` of a `declared`-byte body, waits for the server to refuse it,
    sends `sent_after` bytes more, then reads the answer."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        head = (
            f"PUT {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Content-Length: {declared}\r\n\r\n"
        ).encode()
        sock.sendall(head + head_of_body)
        time.sleep(1)  # the answer is out by now; a server that closes now resets the link
        sock.sendall(bytes(sent_after))
        sock.shutdown(socket.SHUT_WR)
        answer = bytearray()
        while chunk := sock.recv(1 << 16):
            answer += chunk
        return bytes(answer)


def test_refused_body_gets_its_answer_while_the_sender_keeps_sending(
    server: Server, tmp_path: Path
) -> None:
    server.create(manifest("bad"))
    url = server.upload_url("bad")
    body = invalid_qcow2(tmp_path) + bytes(2 * MiB)
    answer = refused_put(url, body, declared=64 * MiB, sent_after=16 * MiB)
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 422 Unprocessable Entity", answer[:300]
    assert b'"reason": "InvalidImage"' in rest or b'"reason":"InvalidImage"' in rest
    assert server.wait_phase("bad", ("Failed",))["status"]["phase"] == "Failed"


def test_a_sender_that_goes_away_mid_body_leaves_no_error_in_the_log(
    server: Server, tmp_path: Path
) -> None:
    server.create(manifest("dropped"))
    url = server.upload_url("dropped")
    parts = urlsplit(url)
    for _ in range(3):
        with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
            head = (
                f"PUT {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                f"Content-Range: bytes 0-{64 * MiB - 1}/{64 * MiB}\r\n"
                f"Content-Length: {64 * MiB}\r\n\r\n"
            ).encode()
            sock.sendall(head + bytes(4 * MiB))
            # A reset, not a close: the server learns of it while writing its answer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.5)
    assert server.get("dropped")["status"]["phase"] == "WaitForUserUpload"
    log = server.log_path.read_text()
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
