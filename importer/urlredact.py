"""URLs as messages and logs show them: without the credentials they may carry.

`http://user:pass@host/x` is shown as `http://***@host/x`; the request itself still sends
them. A query (`?token=...`) is kept: it names the file as much as it authorises.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# scheme://userinfo@ : the userinfo runs to the last @ before the path, query or fragment.
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#\s]*@")


def redact_url(url: str) -> str:
    """`url` with its userinfo, if any, replaced by `***`."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_urls_in(url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"***@{host}"))


def redact_urls_in(text: str) -> str:
    """`text` with the userinfo of every URL in it replaced by `***`."""
    return _USERINFO.sub(r"\1***@", text)
