"""`dvcr-uploader` with the habits kubectl users bring: upload in one command, several names
and kinds, -A, -l, --show-labels, delete -f/--all, wait, custom columns, the namespace of a
manifest, and events in describe. Real server, real command line, printed output."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from diskimages import MiB, sha256_file
from serverproc import Server, manifest

# The scripts of the environment the tests run in.
VENV_BIN = str(Path(sys.executable).parent)


def run(server: Server, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`dvcr-uploader ARGS` as a user runs it, against `server`."""
    env = {
        **os.environ,
        "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}",
        "DVCR_SERVER": server.url,
    }
    if server.token is not None:
        env["DVCR_TOKEN"] = server.token
    return subprocess.run(
        ["dvcr-uploader", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def image_yaml(name: str, namespace: str | None = None, labels: str = "") -> str:
    ns = f"  namespace: {namespace}\n" if namespace else ""
    lab = f"  labels: {{{labels}}}\n" if labels else ""
    return (
        "apiVersion: virtualization.deckhouse.io/v1alpha2\nkind: VirtualImage\n"
        f"metadata:\n  name: {name}\n{ns}{lab}"
        "spec:\n  storage: ContainerRegistry\n  dataSource:\n    type: Upload\n"
    )


def image_with_a_wrong_sha256(name: str) -> str:
    """An image whose upload will fail its checksum."""
    checksum = "type: Upload\n    upload: {checksum: {sha256: '" + "0" * 64 + "'}}"
    return image_yaml(name).replace("type: Upload", checksum)


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(3 * MiB))
    return path


@pytest.fixture
def srv(server: Server) -> Iterator[Server]:
    yield server


# -- 1. upload FILE --create NAME ---------------------------------------------------------


def test_upload_create_makes_the_image_uploads_and_prints_its_row(srv: Server, disk: Path) -> None:
    out = run(srv, "upload", str(disk), "--create", "one-shot", "-q")
    assert out.returncode == 0, out.stderr
    assert "virtualimage.virtualization.deckhouse.io/one-shot created" in out.stderr
    assert f"sha256 {sha256_file(disk)}: the image holds {disk}" in out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "CDROM", "PROGRESS", "AGE"]
    assert re.fullmatch(r"one-shot\s+Ready\s+false\s+100%\s+\d+s", lines[1])
    image = srv.get("one-shot")
    assert image["spec"]["storage"] == "ContainerRegistry"  # the server's and README's default
    assert image["status"]["checksum"]["sha256"] == sha256_file(disk)

    again = run(srv, "upload", str(disk), "--create", "one-shot", "-q")
    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr == (
        'error: virtualimage.virtualization.deckhouse.io "one-shot" already exists and is '
        f"Ready; to compare {disk} with it: dvcr-uploader upload {disk} vi/one-shot; to "
        "replace it, delete it first\n"
    )
    # The vi/NAME form keeps working: it compares with the Ready image.
    compare = run(srv, "upload", str(disk), "vi/one-shot", "-q")
    assert compare.returncode == 0, compare.stderr
    assert "already uploaded" in compare.stderr


def test_upload_create_reuses_an_image_that_waits_and_refuses_another_spec(
    srv: Server, disk: Path
) -> None:
    srv.create(manifest("waiting", storage="PersistentVolumeClaim"), namespace="team")
    other = run(
        srv, "upload", str(disk), "--create", "waiting", "-n", "team", "--storage",
        "ContainerRegistry",
    )  # fmt: skip
    assert other.returncode == 1
    assert other.stderr == (
        'error: virtualimage.virtualization.deckhouse.io "waiting" already exists with storage '
        "PersistentVolumeClaim, not ContainerRegistry; give --storage PersistentVolumeClaim to "
        "upload to it, or delete it first\n"
    )
    reused = run(srv, "upload", str(disk), "--create", "waiting", "-n", "team", "-q")
    assert reused.returncode == 0, reused.stderr
    assert (
        "virtualimage.virtualization.deckhouse.io/waiting exists and waits for an upload: "
        f"{disk} goes to it" in reused.stderr
    )
    assert re.fullmatch(r"waiting\s+Ready\s+false\s+100%\s+\d+s", reused.stdout.splitlines()[1])
    assert srv.get("waiting", "team")["spec"]["storage"] == "PersistentVolumeClaim"


def test_upload_create_cluster_image_and_no_wait(srv: Server, disk: Path) -> None:
    pvc = run(srv, "upload", str(disk), "--create", "shared", "--cluster", "--storage",
              "PersistentVolumeClaim")  # fmt: skip
    assert (pvc.returncode, pvc.stderr) == (
        1,
        "error: a ClusterVirtualImage is stored in DVCR only: --storage ContainerRegistry\n",
    )
    out = run(srv, "upload", str(disk), "--create", "shared", "--cluster", "--no-wait", "-q")
    assert out.returncode == 0, out.stderr
    assert "clustervirtualimage.virtualization.deckhouse.io/shared created" in out.stderr
    assert out.stdout.splitlines()[1].split()[0] == "shared"
    listed = run(srv, "get", "cvi", "shared", "-o", "jsonpath={.status.phase}")
    assert listed.stdout == "Ready"


def test_upload_usage_shows_the_one_line_form_first(srv: Server, disk: Path) -> None:
    helped = run(srv, "upload", "--help")
    assert helped.stdout.startswith("usage: dvcr-uploader upload FILE --create NAME")
    both = run(srv, "upload", str(disk), "vi/x", "--create", "x")
    assert both.returncode == 2
    assert "give --create NAME or vi/x, not both" in both.stderr
    alone = run(srv, "upload", str(disk), "vi/x", "--storage", "PersistentVolumeClaim")
    assert alone.returncode == 2
    assert "--storage and --cluster go with --create NAME" in alone.stderr


# -- 2. get: names, kinds, -A, -l, --show-labels --------------------------------------------


def test_get_several_names_kinds_and_namespaces(srv: Server, disk: Path) -> None:
    for name, ns in (("a", "default"), ("b", "default"), ("c", "team")):
        assert run(srv, "apply", "-f", "-", "-n", ns, stdin=image_yaml(name)).returncode == 0
    two = run(srv, "get", "vi", "a", "b", "-o", "name")
    assert two.stdout == (
        "virtualimage.virtualization.deckhouse.io/a\nvirtualimage.virtualization.deckhouse.io/b\n"
    )
    missing = run(srv, "get", "vi", "a", "nope")
    assert missing.returncode == 1
    assert missing.stderr == (
        'Error from server (NotFound): virtualimage.virtualization.deckhouse.io "nope" not found\n'
    )
    assert [line.split()[0] for line in missing.stdout.splitlines()] == ["NAME", "a"]

    everywhere = run(srv, "get", "vi", "-A").stdout.splitlines()
    assert everywhere[0].split() == ["NAMESPACE", "NAME", "PHASE", "CDROM", "PROGRESS", "AGE"]
    assert [line.split()[:2] for line in everywhere[1:]] == [
        ["default", "a"],
        ["default", "b"],
        ["team", "c"],
    ]
    by_name = run(srv, "get", "vi", "a", "-A")
    assert by_name.returncode == 1
    assert "a resource cannot be retrieved by name across all namespaces" in by_name.stderr

    run(srv, "upload", str(disk), "--create", "shared", "--cluster", "--no-wait", "-q")
    cluster = run(srv, "get", "cvi", "-A").stdout.splitlines()
    assert cluster[0].split() == ["NAME", "PHASE", "CDROM", "PROGRESS", "AGE"]
    kinds = run(srv, "get", "vi,cvi").stdout
    tables = kinds.split("\n\n")
    assert len(tables) == 2, kinds
    assert tables[0].splitlines()[1].startswith("virtualimage.virtualization.deckhouse.io/a ")
    assert (
        tables[1]
        .splitlines()[1]
        .startswith("clustervirtualimage.virtualization.deckhouse.io/shared ")
    )


def test_get_with_label_selectors_and_show_labels(srv: Server) -> None:
    for name, labels in (
        ("web", "tier: front, os: ubuntu"),
        ("db", "tier: back, os: ubuntu"),
        ("bare", ""),
    ):
        out = run(srv, "apply", "-f", "-", stdin=image_yaml(name, labels=labels))
        assert out.returncode == 0, out.stderr

    def names(selector: str) -> list[str]:
        out = run(srv, "get", "vi", "-l", selector, "-o", "jsonpath={.items[*].metadata.name}")
        assert out.returncode == 0, out.stderr
        return out.stdout.split()

    assert names("tier=front") == ["web"]
    assert names("os=ubuntu,tier!=front") == ["db"]
    assert names("tier!=front") == ["bare", "db"]  # != also selects images without the label
    assert names("tier") == ["db", "web"]
    assert names("!tier") == ["bare"]
    assert names("tier in (front,back),os==ubuntu") == ["db", "web"]
    assert names("tier notin (front)") == ["bare", "db"]
    none = run(srv, "get", "vi", "-l", "tier=middle")
    assert (none.stdout, none.stderr) == ("", "No resources found in default namespace.\n")

    bad = run(srv, "get", "vi", "-l", "tier=fr ont")
    assert bad.returncode == 1
    assert bad.stderr.startswith(
        'Error from server (BadRequest): unable to parse the label selector "tier=fr ont": '
    )
    with_name = run(srv, "get", "vi", "web", "-l", "tier=front")
    assert with_name.stderr == "error: name cannot be provided when a selector is specified\n"

    shown = run(srv, "get", "vi", "--show-labels").stdout.splitlines()
    assert shown[0].split()[-1] == "LABELS"
    rows = {line.split()[0]: line.split()[-1] for line in shown[1:]}
    assert rows == {"bare": "<none>", "db": "os=ubuntu,tier=back", "web": "os=ubuntu,tier=front"}


def test_labels_are_validated_as_kubernetes_validates_them(srv: Server) -> None:
    bad_key = run(srv, "apply", "-f", "-", stdin=image_yaml("x", labels='"-bad": v'))
    assert bad_key.returncode == 1
    assert bad_key.stderr.startswith(
        'Error from server (Invalid): metadata.labels: Invalid value: "-bad": name part must '
        "consist of alphanumeric characters"
    )
    long_value = run(srv, "apply", "-f", "-", stdin=image_yaml("x", labels="k: " + "v" * 64))
    assert long_value.returncode == 1
    assert long_value.stderr == (
        f'Error from server (Invalid): metadata.labels: Invalid value: "{"v" * 64}": must be '
        "no more than 63 characters\n"
    )
    prefixed = run(srv, "apply", "-f", "-", stdin=image_yaml("x", labels="example.com/os: a_b"))
    assert prefixed.returncode == 0, prefixed.stderr


def test_watch_with_a_label_selector(srv: Server, disk: Path) -> None:
    run(srv, "apply", "-f", "-", stdin=image_yaml("other"))
    run(srv, "apply", "-f", "-", stdin=image_yaml("watched", labels="team: a"))
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "DVCR_SERVER": srv.url}
    watch = subprocess.Popen(
        ["dvcr-uploader", "get", "vi", "-w", "-l", "team=a"],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert watch.stdout is not None
        header, first = watch.stdout.readline(), watch.stdout.readline()
        assert header.split() == ["NAME", "PHASE", "CDROM", "PROGRESS", "AGE"]
        assert first.split()[:2] == ["watched", "WaitForUserUpload"]
        assert run(srv, "upload", str(disk), "vi/watched", "-q").returncode == 0
        while True:
            line = watch.stdout.readline()
            assert line, "the watch ended"
            assert line.split()[0] == "watched"
            if line.split()[1] == "Ready":
                break
    finally:
        watch.terminate()
        watch.wait(timeout=10)


# -- 3. delete -f, --all, several names ---------------------------------------------------


def test_delete_by_file_all_and_names(srv: Server, tmp_path: Path) -> None:
    path = tmp_path / "images.yaml"
    path.write_text(image_yaml("f1") + "---\n" + image_yaml("f2"))
    assert run(srv, "apply", "-f", str(path)).returncode == 0
    for name in ("n1", "n2", "n3"):
        run(srv, "apply", "-f", "-", stdin=image_yaml(name))
    run(srv, "apply", "-f", "-", "-n", "team", stdin=image_yaml("kept"))

    by_file = run(srv, "delete", "-f", str(path))
    assert by_file.returncode == 0, by_file.stderr
    assert by_file.stdout == (
        'virtualimage.virtualization.deckhouse.io "f1" deleted\n'
        'virtualimage.virtualization.deckhouse.io "f2" deleted\n'
    )
    by_names = run(srv, "delete", "vi", "n1", "n2", "gone")
    assert by_names.returncode == 1
    assert by_names.stdout.splitlines() == [
        'virtualimage.virtualization.deckhouse.io "n1" deleted',
        'virtualimage.virtualization.deckhouse.io "n2" deleted',
    ]
    assert "(NotFound)" in by_names.stderr and '"gone" not found' in by_names.stderr
    everything = run(srv, "delete", "vi", "--all")
    assert everything.stdout == 'virtualimage.virtualization.deckhouse.io "n3" deleted\n'
    assert run(srv, "get", "vi").stderr == "No resources found in default namespace.\n"
    assert run(srv, "get", "vi", "kept", "-n", "team").returncode == 0
    nothing = run(srv, "delete", "vi")
    assert nothing.returncode == 1
    assert "no name was specified" in nothing.stderr


def test_delete_by_label_selector_and_a_manifest_of_another_namespace(
    srv: Server, tmp_path: Path
) -> None:
    run(srv, "apply", "-f", "-", stdin=image_yaml("tmp-1", labels="scratch: 'yes'"))
    run(srv, "apply", "-f", "-", stdin=image_yaml("keep-1"))
    selected = run(srv, "delete", "vi", "-l", "scratch=yes")
    assert selected.stdout == 'virtualimage.virtualization.deckhouse.io "tmp-1" deleted\n'
    assert run(srv, "get", "vi", "-o", "name").stdout == (
        "virtualimage.virtualization.deckhouse.io/keep-1\n"
    )
    path = tmp_path / "elsewhere.yaml"
    path.write_text(image_yaml("keep-1", namespace="default"))
    refused = run(srv, "delete", "-f", str(path), "-n", "team")
    assert refused.returncode == 1
    assert refused.stderr.startswith(
        'error: the namespace from the provided object "default" does not match the namespace '
        '"team".'
    )
    assert run(srv, "get", "vi", "keep-1").returncode == 0


# -- 4. wait ------------------------------------------------------------------------------------


def test_wait_for_a_phase_a_timeout_and_deletion(srv: Server, disk: Path) -> None:
    run(srv, "apply", "-f", "-", stdin=image_yaml("slow"))
    timed_out = run(srv, "wait", "vi/slow", "--for=jsonpath={.status.phase}=Ready",
                    "--timeout=1s")  # fmt: skip
    assert (timed_out.returncode, timed_out.stdout, timed_out.stderr) == (
        1,
        "",
        "error: timed out waiting for the condition on virtualimages/slow\n",
    )
    waiting = subprocess.Popen(
        ["dvcr-uploader", "wait", "vi/slow", "--for=jsonpath={.status.phase}=Ready",
         "--timeout=60s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "DVCR_SERVER": srv.url},
    )  # fmt: skip
    assert run(srv, "upload", str(disk), "vi/slow", "-q").returncode == 0
    out, err = waiting.communicate(timeout=60)
    assert (waiting.returncode, out) == (
        0,
        "virtualimage.virtualization.deckhouse.io/slow condition met\n",
    ), err
    condition = run(srv, "wait", "vi", "slow", "--for=condition=Ready")
    assert condition.stdout == "virtualimage.virtualization.deckhouse.io/slow condition met\n"

    missing = run(srv, "wait", "vi/nope", "--for=jsonpath={.status.phase}=Ready")
    assert missing.returncode == 1
    assert missing.stderr == (
        'Error from server (NotFound): virtualimage.virtualization.deckhouse.io "nope" not found\n'
    )
    run(srv, "delete", "vi", "slow")
    gone = run(srv, "wait", "vi/slow", "--for=delete", "--timeout=30s")
    assert gone.stdout == "virtualimage.virtualization.deckhouse.io/slow condition met\n"
    bad = run(srv, "wait", "vi/slow", "--for=ready")
    assert bad.returncode == 1 and "unrecognized condition" in bad.stderr


def test_wait_for_the_images_a_selector_or_all_selects(srv: Server, disk: Path) -> None:
    run(srv, "apply", "-f", "-", stdin=image_yaml("lab-1", labels="batch: nightly"))
    run(srv, "apply", "-f", "-", stdin=image_yaml("lab-2", labels="batch: nightly"))
    run(srv, "apply", "-f", "-", stdin=image_yaml("other"))
    for name in ("lab-1", "lab-2"):
        assert run(srv, "upload", str(disk), f"vi/{name}", "-q").returncode == 0
    selected = run(srv, "wait", "vi", "-l", "batch=nightly", "--for=condition=Ready",
                   "--timeout=30s")  # fmt: skip
    assert (selected.returncode, selected.stdout) == (
        0,
        "virtualimage.virtualization.deckhouse.io/lab-1 condition met\n"
        "virtualimage.virtualization.deckhouse.io/lab-2 condition met\n",
    ), selected.stderr
    everything = run(srv, "wait", "vi", "--all", "--for=condition=Ready", "--timeout=1s")
    assert everything.returncode == 1
    assert "timed out waiting for the condition on virtualimages/other" in everything.stderr
    none = run(srv, "wait", "vi", "-l", "batch=weekly", "--for=condition=Ready")
    assert (none.returncode, none.stderr) == (1, "error: no matching resources found\n")
    both = run(srv, "wait", "vi/lab-1", "-l", "batch=nightly", "--for=condition=Ready")
    assert both.returncode == 1 and "name cannot be provided" in both.stderr


def test_delete_waits_until_an_image_that_imports_read_is_gone(tmp_path: Path, disk: Path) -> None:
    slow = {"DVCR_FAULT_SINK_BYTES_PER_SEC": str(4 * MiB)}
    with Server(tmp_path / "data", env=slow).start() as srv:
        big = tmp_path / "big.img"
        big.write_bytes(os.urandom(24 * MiB))
        run(srv, "apply", "-f", "-", stdin=image_yaml("base"))
        assert run(srv, "upload", str(big), "vi/base", "-q").returncode == 0
        # The copy goes to a claim, whose writes the server was told to slow down.
        copy = (
            image_yaml("copy")
            .replace("ContainerRegistry", "PersistentVolumeClaim")
            .replace(
                "    type: Upload\n",
                "    type: ObjectRef\n    objectRef:\n      kind: VirtualImage\n      name: base\n",
            )
        )
        run(srv, "apply", "-f", "-", stdin=copy)
        srv.wait_phase("copy", ("Provisioning",))
        quick = run(srv, "delete", "vi", "base", "--wait=false")
        assert quick.stdout == 'virtualimage.virtualization.deckhouse.io "base" deleted\n'
        assert srv.get("base")["status"]["phase"] == "Terminating"
        short = run(srv, "delete", "vi", "base", "--timeout=1s")
        assert short.returncode == 1
        assert "timed out waiting for virtualimages/base to be deleted" in short.stderr
        waited = run(srv, "delete", "vi", "base")
        assert waited.returncode == 0, waited.stderr
        # Gone when the command returned, not later: the copy that read it is done.
        assert run(srv, "get", "vi", "base").returncode == 1
        assert srv.get("copy")["status"]["phase"] == "Ready"


# -- 5. custom columns ----------------------------------------------------------------------------


def test_get_custom_columns(srv: Server) -> None:
    run(srv, "apply", "-f", "-", stdin=image_yaml("cols", labels="os: alpine"))
    out = run(
        srv, "get", "vi", "-o",
        "custom-columns=NAME:.metadata.name,PHASE:.status.phase,OS:{.metadata.labels.os},"
        "SIZE:.status.size.stored",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["NAME", "PHASE", "OS", "SIZE"]
    assert lines[1].split() == ["cols", "WaitForUserUpload", "alpine", "<none>"]
    assert lines[0].index("PHASE") == lines[1].index("WaitForUserUpload")
    bad = run(srv, "get", "vi", "-o", "custom-columns=NAME")
    assert (bad.returncode, bad.stderr) == (
        1,
        "error: unexpected custom-columns spec: NAME, expected <header>:<json-path-expr>\n",
    )


# -- 6. the namespace of a manifest ---------------------------------------------------------------


@pytest.mark.parametrize("command", ["apply", "create"])
def test_a_manifest_namespace_that_differs_from_n_is_refused(srv: Server, command: str) -> None:
    out = run(srv, command, "-f", "-", "-n", "x", stdin=image_yaml("img", namespace="y"))
    assert out.returncode == 1
    assert out.stderr == (
        'error: the namespace from the provided object "y" does not match the namespace "x". '
        "You must pass '--namespace=y' to perform this operation.\n"
    )
    assert srv.call("GET", srv.images_path("y", "img"))[0] == 404
    own = run(srv, command, "-f", "-", stdin=image_yaml("img", namespace="y"))
    assert own.stdout == "virtualimage.virtualization.deckhouse.io/img created\n"
    assert srv.get("img", "y")["metadata"]["namespace"] == "y"
    if command == "create":
        twice = run(srv, "create", "-f", "-", stdin=image_yaml("img", namespace="y"))
        assert twice.returncode == 1
        assert twice.stderr.startswith("Error from server (AlreadyExists): ")


# -- 7. events in describe -----------------------------------------------------------------------


def test_describe_shows_the_events_of_the_image(srv: Server, disk: Path) -> None:
    run(srv, "apply", "-f", "-", stdin=image_yaml("evented"))
    assert run(srv, "upload", str(disk), "vi/evented", "-q").returncode == 0
    described = run(srv, "describe", "vi", "evented")
    assert described.returncode == 0, described.stderr
    events = described.stdout.split("Events:\n", 1)[1].splitlines()
    assert events[0].split() == ["Type", "Reason", "Age", "From", "Message"]
    assert events[1].split() == ["----", "------", "----", "----", "-------"]
    rows = [re.split(r"\s{2,}", line.strip()) for line in events[2:]]
    assert [row[:2] for row in rows] == [
        ["Normal", "WaitForUserUpload"],
        ["Normal", "Provisioning"],
        ["Normal", "Ready"],
    ]
    assert all(re.fullmatch(r"\d+s", row[2]) and row[3] == "dvcr-uploader" for row in rows)
    assert rows[0][4] == "Waiting for upload"
    assert rows[2][4] == "The image is ready"
    assert events[0].index("Reason") == events[2].index("WaitForUserUpload")

    code, listed = srv.call("GET", srv.images_path(name="evented") + "/events")
    assert code == 200
    assert listed["kind"] == "EventList"
    assert listed["items"][0]["involvedObject"]["name"] == "evented"


def test_describe_warns_of_a_failure(srv: Server, disk: Path) -> None:
    run(srv, "apply", "-f", "-", stdin=image_with_a_wrong_sha256("checked"))
    failed = run(srv, "upload", str(disk), "vi/checked", "-q")
    assert failed.returncode == 1
    text = run(srv, "describe", "vi/checked").stdout
    warning = [line for line in text.splitlines() if line.strip().startswith("Warning")]
    assert len(warning) == 1 and "BadImageChecksum" in warning[0], text
    assert srv.get("checked")["status"]["phase"] == "Failed"


def test_a_failed_image_says_how_to_start_over(srv: Server, disk: Path) -> None:
    doc = image_with_a_wrong_sha256("again")
    run(srv, "apply", "-f", "-", stdin=doc)
    failed = run(srv, "upload", str(disk), "vi/again", "-q")
    assert failed.returncode == 1
    hint = "; to start over, apply the image with a changed spec, or delete it and create it again"
    assert failed.stderr.startswith("error: upload refused (422 BadImageChecksum: ")
    assert failed.stderr.endswith(hint + ")\n"), failed.stderr
    shown_later = run(srv, "upload", str(disk), "vi/again", "-q")
    assert shown_later.stderr.startswith("error: vi/again failed (BadImageChecksum): ")
    assert shown_later.stderr.endswith(hint + "\n"), shown_later.stderr
    message = run(srv, "get", "vi", "again", "-o", "jsonpath={.status.conditions[0].message}")
    assert message.stdout.endswith(hint)
    assert run(srv, "apply", "-f", "-", stdin=doc).stdout.endswith("again unchanged\n")
    changed = run(srv, "apply", "-f", "-", stdin=image_yaml("again"))
    assert changed.stdout.endswith("again configured\n")
    assert run(srv, "upload", str(disk), "vi/again", "-q").returncode == 0
    assert srv.get("again")["status"]["phase"] == "Ready"
