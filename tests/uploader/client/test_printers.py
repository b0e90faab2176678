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


def test_events_are_shown_as_kubectl_describe_shows_them() -> None:
    from datetime import UTC, datetime

    from uploader.client.printers import describe_events

    now = datetime(2026, 1, 1, 12, 10, tzinfo=UTC)
    events = [
        {
            "type": "Warning",
            "reason": "BadImageChecksum",
            "message": "sha256 differs",
            "firstTimestamp": "2026-01-01T12:09:50Z",
            "lastTimestamp": "2026-01-01T12:09:50Z",
            "count": 1,
            "source": {"component": "dvcr-uploader"},
        },
        {
            "type": "Normal",
            "reason": "WaitForUserUpload",
            "message": "The last upload was interrupted",
            "firstTimestamp": "2026-01-01T12:00:00Z",
            "lastTimestamp": "2026-01-01T12:08:00Z",
            "count": 3,
            "source": {"component": "dvcr-uploader"},
        },
    ]
    assert describe_events(events, now).splitlines() == [
        "Events:",
        "  Type     Reason             Age               From           Message",
        "  ----     ------             ----              ----           -------",
        "  Normal   WaitForUserUpload  2m (x3 over 10m)  dvcr-uploader  The last upload was "
        "interrupted",
        "  Warning  BadImageChecksum   10s               dvcr-uploader  sha256 differs",
    ]
    assert describe_events([]) == "Events:  <none>"


def test_custom_columns_and_labels() -> None:
    from uploader.client.printers import (
        CustomColumnsError,
        custom_columns,
        custom_row,
        labels_cell,
    )

    obj = {"metadata": {"name": "a", "labels": {"z": "1", "a": "2"}}, "status": {"phase": "Ready"}}
    columns = custom_columns("NAME:.metadata.name,PHASE:{.status.phase},GONE:.status.nothing")
    assert [header for header, _ in columns] == ["NAME", "PHASE", "GONE"]
    assert custom_row(obj, columns) == ["a", "Ready", "<none>"]
    assert labels_cell(obj) == "a=2,z=1"
    assert labels_cell({"metadata": {}}) == "<none>"
    for bad in ("", "NAME", "NAME:", ":.metadata.name", "X:.a..b"):
        with pytest.raises(CustomColumnsError):
            custom_columns(bad)
