"""Cross-origin answers of the upload URLs (uploader/server/cors.py), with real curl."""

from __future__ import annotations

import subprocess

from serverproc import Server, manifest

ORIGIN = "https://pages.example"


def headers_of(*args: str) -> tuple[int, dict[str, str]]:
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-D", "-", *args],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode("latin-1")
    lines = out.split("\r\n")
    code = int(lines[0].split()[1])
    found = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            found[name.strip().lower()] = value.strip()
    return code, found


def test_a_browser_may_upload_to_an_upload_url_from_any_origin(server: Server) -> None:
    server.create(manifest("cors"))
    url = server.upload_url("cors")
    code, preflight = headers_of(
        "-X", "OPTIONS", url,
        "-H", f"Origin: {ORIGIN}",
        "-H", "Access-Control-Request-Method: PUT",
        "-H", "Access-Control-Request-Headers: content-range,content-type",
    )  # fmt: skip
    assert code == 204
    assert preflight["access-control-allow-origin"] == "*"
    assert "PUT" in preflight["access-control-allow-methods"]
    assert preflight["access-control-allow-headers"] == "content-range,content-type"
    assert preflight["tus-resumable"] == "1.0.0"  # still tus's discovery

    code, head = headers_of("-I", url, "-H", f"Origin: {ORIGIN}")
    assert code == 200
    assert head["access-control-allow-origin"] == "*"
    exposed = {h.strip().lower() for h in head["access-control-expose-headers"].split(",")}
    assert {"upload-offset", "upload-length", "tus-resumable", "location"} <= exposed

    # Refusals are readable too: a page can tell a wrong token from a network error.
    code, refused = headers_of("-I", url + "x", "-H", f"Origin: {ORIGIN}")
    assert code == 404 and refused["access-control-allow-origin"] == "*"


def test_without_an_origin_no_cors_headers_are_sent(server: Server) -> None:
    server.create(manifest("plain"))
    code, head = headers_of("-I", server.upload_url("plain"))
    assert code == 200
    assert not any(name.startswith("access-control-") for name in head)
