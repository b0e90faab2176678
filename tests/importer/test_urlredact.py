"""Credentials in URLs are never shown."""

from __future__ import annotations

import pytest

from importer.urlredact import redact_url, redact_urls_in


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://user:pass@host/x", "http://***@host/x"),
        ("https://user@host:8443/x?token=abc", "https://***@host:8443/x?token=abc"),
        ("http://u:p@ss@host/x", "http://***@host/x"),
        ("http://user:pass@[::1]:80/x", "http://***@[::1]:80/x"),
        ("http://host/x@y", "http://host/x@y"),
        ("http://host/x?a=b@c", "http://host/x?a=b@c"),
        ("http://host/x", "http://host/x"),
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_redact_urls_in_a_message() -> None:
    text = "cannot GET http://u:hunter2@a/x, then https://tok@b:5/y?q=1 and c@d"
    assert redact_urls_in(text) == "cannot GET http://***@a/x, then https://***@b:5/y?q=1 and c@d"
