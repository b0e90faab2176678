from __future__ import annotations

import pytest

from uploader.client.printers import human_duration, jsonpath, table


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (4, "4s"),
        (119, "119s"),
        (120, "2m"),
        (123, "2m3s"),
        (15 * 60 + 5, "15m"),
        (3 * 3600 + 30 * 60, "3h30m"),
        (23 * 3600, "23h"),
        (3 * 86400 + 4 * 3600, "3d4h"),
        (400 * 86400, "400d"),
        (3 * 365 * 86400 + 10 * 86400, "3y10d"),
    ],
)
def test_human_duration_matches_kubectl(seconds: int, text: str) -> None:
    assert human_duration(seconds) == text


OBJ = {
    "metadata": {"name": "a"},
    "status": {
        "phase": "Ready",
        "cdrom": False,
        "imageUploadURLs": {"external": "e", "inCluster": "i"},
    },
}
LIST = {"items": [OBJ, {"metadata": {"name": "b"}, "status": {"phase": "Failed"}}]}


@pytest.mark.parametrize(
    ("template", "out"),
    [
        ("{.status.phase}", "Ready"),
        (".status.phase", "Ready"),
        ("{.status.cdrom}", "false"),
        ("{.status.imageUploadURLs}", '{"external":"e","inCluster":"i"}'),
        ("{.status['imageUploadURLs'].external}", "e"),
        ("{.status.missing}", ""),
        ("name={.metadata.name}!", "name=a!"),
    ],
)
def test_jsonpath_on_an_object(template: str, out: str) -> None:
    assert jsonpath(template, OBJ) == out


def test_jsonpath_on_a_list() -> None:
    assert jsonpath("{.items[*].metadata.name}", LIST) == "a b"
    assert jsonpath("{.items[1].status.phase}", LIST) == "Failed"
    assert jsonpath("{.items[-1].metadata.name}", LIST) == "b"
    rendered = jsonpath('{range .items[*]}{.metadata.name}={.status.phase}{"\\n"}{end}', LIST)
    assert rendered == "a=Ready\nb=Failed\n"


def test_table_pads_columns() -> None:
    text = table([["some-image", "Ready"], ["x", "WaitForUserUpload"]], ["NAME", "PHASE"])
    assert text.splitlines() == [
        "NAME         PHASE",
        "some-image   Ready",
        "x            WaitForUserUpload",
    ]
