"""CDI's upload protocol, sent by curl header for header as its clients send it: virtctl
image-upload (Go's HTTP client: a HEAD probe of upload-async, then a POST of the file) and
the OpenShift console (a form, from a page of another origin)."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from diskimages import MiB, qemu_convert, sha256_file, write_disk_image
from dvcrimage import check_image, skopeo_copy
from serverproc import Server, manifest

CONSOLE_ORIGIN = "https://console-openshift-console.apps.example.com"
AXIOS_ACCEPT = "Accept: application/json, text/plain, */*"
# Go's client sends neither Accept nor Expect; curl would add both unless told not to.
GO_CLIENT = ("-H", "User-Agent: Go-http-client/1.1", "-H", "Accept:", "-H", "Expect:")
ASYNC_PATHS = [
    "/v1beta1/upload-async",
    "/v1beta1/upload-form-async",
    "/v1alpha1/upload-async",
    "/v1alpha1/upload-form-async",
]


@dataclass
class Answer:
    code: int
    headers: dict[str, str]  # lower-case names, the last value of each
    body: dict[str, Any]
    sent: int  # bytes of the body curl sent


def send(*args: str, head: bool = False) -> Answer:
    """One curl request; its answer's code, headers and JSON body."""
    out = subprocess.run(
        [
            "curl",
            "-sS",
            *(["-I", "-o", "/dev/null"] if head else []),
            "-w",
            "\n@@ %{http_code} %{size_upload}\n%{header_json}",
            *args,
        ],
        capture_output=True,
        check=True,
        timeout=120,
    ).stdout.decode()
    body, _, tail = out.rpartition("\n@@ ")
    numbers, _, headers = tail.partition("\n")
    code, sent = numbers.split()
    return Answer(
        int(code),
        {name.lower(): values[-1] for name, values in json.loads(headers).items()},
        json.loads(body) if body.strip() else {},
        int(sent),
    )


def bearer(token: str) -> tuple[str, str]:
    return ("-H", f"Authorization: Bearer {token}")


def token_of(upload_url: str) -> str:
    return upload_url.rsplit("/", 1)[1]


def go_head(url: str, token: str) -> Answer:
    """virtctl's probe: http.NewRequest("HEAD", url) with the bearer token."""
    return send(*GO_CLIENT, *bearer(token), url, head=True)


def go_post_args(url: str, token: str, image: Path) -> list[str]:
    """virtctl's upload: POST, the file's length as Content-Length, the bearer token,
    Content-Type application/octet-stream; Go's transport adds Accept-Encoding: gzip."""
    return [
        *GO_CLIENT,
        *bearer(token),
        "-H",
        "Content-Type: application/octet-stream",
        "-H",
        "Accept-Encoding: gzip",
        "-X",
        "POST",
        "-T",
        str(image),
        url,
    ]


def virtctl_upload(base: str, token: str, image: Path) -> tuple[str, Answer]:
    """What virtctl image-upload sends to the upload proxy: the async path when its HEAD
    answers 200, else the sync one; returns the path used and the answer."""
    path = "/v1beta1/upload-async"
    if go_head(base + path, token).code != 200:
        path = "/v1beta1/upload"
    return path, send(*go_post_args(base + path, token, image))


@dataclass
class Qcow2:
    image: Path
    sha256: str  # of the qcow2 file, what the image's checksum is
    raw_sha256: str  # of the disk inside, what a claim holds


@pytest.fixture(scope="module")
def qcow2(tmp_path_factory: pytest.TempPathFactory) -> Qcow2:
    directory = tmp_path_factory.mktemp("cdi-images")
    raw_sha256, _ = write_disk_image(directory / "disk.raw", 24 * MiB, seed=91)
    image = qemu_convert(directory / "disk.raw", "qcow2", directory / "disk.qcow2")
    return Qcow2(image, sha256_file(image), raw_sha256)


def check_claim(server: Server, name: str, qcow2: Qcow2) -> None:
    status = server.wait_phase(name, ("Ready",))["status"]
    assert status["checksum"]["sha256"] == qcow2.sha256
    assert status["format"] == "qcow2"
    assert sha256_file(server.claim_dir(name) / "disk.img") == qcow2.raw_sha256


def test_virtctl_uploads_into_a_claim_through_upload_async(server: Server, qcow2: Qcow2) -> None:
    server.create(manifest("vctl"))
    token = token_of(server.upload_url("vctl"))

    path, answer = virtctl_upload(server.url, token, qcow2.image)

    assert path == "/v1beta1/upload-async"
    assert answer.code == 200, answer.body
    assert answer.body["offset"] == qcow2.image.stat().st_size
    check_claim(server, "vctl", qcow2)


def test_the_sync_path_answers_once_the_image_is_ready(server: Server, qcow2: Qcow2) -> None:
    server.create(manifest("sync"))
    token = token_of(server.upload_url("sync"))

    answer = send(*go_post_args(server.url + "/v1beta1/upload", token, qcow2.image))

    assert answer.code == 200, answer.body
    assert answer.body["phase"] == "Ready"
    assert answer.body["checksum"]["sha256"] == qcow2.sha256
    assert server.get("sync")["status"]["phase"] == "Ready"
    check_claim(server, "sync", qcow2)


def test_virtctl_uploads_into_the_container_registry(
    server: Server, qcow2: Qcow2, tmp_path: Path
) -> None:
    server.create(manifest("vreg", storage="ContainerRegistry"))
    token = token_of(server.upload_url("vreg"))

    path, answer = virtctl_upload(server.url, token, qcow2.image)

    assert (path, answer.code) == ("/v1beta1/upload-async", 200), answer.body
    obj = server.wait_phase("vreg", ("Ready",))
    assert obj["status"]["checksum"]["sha256"] == qcow2.sha256
    out = tmp_path / "copy"
    copied = skopeo_copy(obj["status"]["target"]["registryURL"], out)
    labels = check_image(out, copied, qcow2.sha256)
    assert labels["source-image-format"] == "qcow2"


def test_the_console_uploads_a_form_from_its_own_origin(server: Server, qcow2: Qcow2) -> None:
    server.create(manifest("console"))
    token = token_of(server.upload_url("console"))
    url = server.url + "/v1beta1/upload-form-async"
    origin = ("-H", f"Origin: {CONSOLE_ORIGIN}")

    # The page first GETs the URL without a token: any answer it may read says the
    # server is reachable and its certificate accepted.
    probe = send(*origin, "-H", AXIOS_ACCEPT, url)
    assert probe.code == 405
    assert probe.headers["access-control-allow-origin"] == "*"
    # The browser's preflight of a POST with Authorization.
    preflight = send(
        *origin,
        "-X",
        "OPTIONS",
        "-H",
        "Access-Control-Request-Method: POST",
        "-H",
        "Access-Control-Request-Headers: authorization,content-type",
        url,
    )
    assert preflight.code == 204
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "POST" in preflight.headers["access-control-allow-methods"]
    assert preflight.headers["access-control-allow-headers"] == "authorization,content-type"
    # The form: FormData with the file in "file", as a browser sends it.
    answer = send(
        *origin,
        "-H",
        AXIOS_ACCEPT,
        *bearer(token),
        "-H",
        "Expect:",
        "-F",
        f"file=@{qcow2.image};type=application/octet-stream",
        url,
    )

    assert answer.code == 200, answer.body
    assert answer.headers["access-control-allow-origin"] == "*"
    assert answer.body["offset"] == qcow2.image.stat().st_size
    check_claim(server, "console", qcow2)


def test_every_path_and_its_v1alpha1_alias(server: Server, tmp_path: Path) -> None:
    for version in ("v1beta1", "v1alpha1"):
        for kind in ("upload", "upload-async", "upload-form", "upload-form-async"):
            name = f"{version}-{kind}"
            image = tmp_path / f"{name}.raw"
            image.write_bytes(os.urandom(2 * MiB))
            server.create(manifest(name))
            token = token_of(server.upload_url(name))
            # Plain curl: it asks for 100 Continue before a body this large.
            body = ["-F", f"file=@{image}"] if "form" in kind else ["-X", "POST", "-T", str(image)]

            answer = send(*bearer(token), *body, f"{server.url}/{version}/{kind}")

            assert answer.code == 200, (name, answer.body)
            if "async" not in kind:
                assert answer.body["phase"] == "Ready"
            status = server.wait_phase(name, ("Ready",))["status"]
            assert status["checksum"]["sha256"] == sha256_file(image), name
            assert sha256_file(server.claim_dir(name) / "disk.img") == sha256_file(image)


@pytest.mark.parametrize("path", ASYNC_PATHS)
def test_head_on_an_async_path_is_200(server: Server, path: str) -> None:
    server.create(manifest("probe"))
    token = token_of(server.upload_url("probe"))
    assert go_head(server.url + path, token).code == 200
    assert send(*GO_CLIENT, server.url + path, head=True).code == 400  # no token


def test_the_sync_paths_take_only_post(server: Server, tmp_path: Path) -> None:
    server.create(manifest("methods"))
    token = token_of(server.upload_url("methods"))
    image = tmp_path / "small.raw"
    image.write_bytes(os.urandom(4096))

    head = go_head(server.url + "/v1beta1/upload", token)
    put = send(*GO_CLIENT, *bearer(token), "-T", str(image), server.url + "/v1beta1/upload")

    assert head.code == 405
    assert put.code == 405
    assert put.body["reason"] == "MethodNotAllowed"
    assert "POST" in put.headers["allow"] and "PUT" not in put.headers["allow"]
    assert server.get("methods")["status"]["phase"] == "WaitForUserUpload"


@pytest.mark.parametrize(
    ("authorization", "code", "reason"),
    [
        (None, 400, "BadRequest"),
        ("Basic dXNlcjpwYXNz", 400, "BadRequest"),
        ("Bearer", 400, "BadRequest"),
        ("Bearer two words", 400, "BadRequest"),
        ("Bearer AAAAnotAtokenAAAA", 401, "Unauthorized"),
    ],
)
@pytest.mark.parametrize("expect", [True, False])
def test_a_request_without_a_valid_token_is_refused_before_its_body(
    server: Server, tmp_path: Path, authorization: str | None, code: int, reason: str, expect: bool
) -> None:
    server.create(manifest("guarded"))
    server.upload_url("guarded")
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(4 * MiB if expect else 4096))
    header = ["-H", f"Authorization: {authorization}"] if authorization else []
    expecting = ["-H", "Expect: 100-continue"] if expect else ["-H", "Expect:"]

    answer = send(
        *header, *expecting, "-X", "POST", "-T", str(image), server.url + "/v1beta1/upload"
    )

    assert answer.code == code
    assert answer.body["reason"] == reason
    assert "Authorization" in answer.body["message"] or "token" in answer.body["message"]
    if expect:
        assert answer.sent == 0  # refused before 100 Continue
    if code == 401:
        assert answer.headers["www-authenticate"].startswith("Bearer")
    assert server.get("guarded")["status"]["phase"] == "WaitForUserUpload"


def test_a_concurrent_upload_is_503_and_a_ready_image_409(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    sha256, _ = write_disk_image(image, 8 * MiB, seed=92)
    server.create(manifest("busy"))
    token = token_of(server.upload_url("busy"))
    sync_url = server.url + "/v1beta1/upload"
    slow = subprocess.Popen(
        [
            "curl",
            "-sS",
            "--limit-rate",
            "2M",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            *go_post_args(sync_url, token, image),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        server.wait_phase("busy", ("Provisioning",))

        second = send(*go_post_args(server.url + "/v1beta1/upload-async", token, image))

        assert second.code == 503
        assert second.body["reason"] == "ServiceUnavailable"
        assert "in progress" in second.body["message"]
        assert slow.communicate(timeout=60)[0] == b"200"
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    assert server.get("busy")["status"]["checksum"]["sha256"] == sha256

    again = send(*go_post_args(sync_url, token, image))

    assert again.code == 409
    assert again.body["reason"] == "Conflict"
    assert "Ready" in again.body["message"]
    assert go_head(server.url + "/v1beta1/upload-async", token).code == 409


def test_a_failed_image_is_410_with_its_reason(
    server: Server, qcow2: Qcow2, tmp_path: Path
) -> None:
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-f", "qcow2", "-F", "qcow2", "-b", str(qcow2.image), str(overlay)],
        check=True,
        capture_output=True,
    )
    server.create(manifest("unsafe"))
    token = token_of(server.upload_url("unsafe"))

    refused = send(*go_post_args(server.url + "/v1beta1/upload", token, overlay))
    again = send(*go_post_args(server.url + "/v1beta1/upload", token, qcow2.image))

    assert refused.code == 422
    assert refused.body["reason"] == "InvalidImage"
    assert "backing file" in refused.body["message"]
    assert again.code == 410
    assert again.body["reason"] == "InvalidImage"
    assert server.get("unsafe")["status"]["phase"] == "Failed"


def test_bodies_of_the_wrong_kind_are_refused(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "small.raw"
    image.write_bytes(os.urandom(4096))
    server.create(manifest("kinds"))
    token = token_of(server.upload_url("kinds"))
    server.create(manifest("registry", storage="ContainerRegistry"))
    registry_token = token_of(server.upload_url("registry"))

    bare_to_form = send(*go_post_args(server.url + "/v1beta1/upload-form", token, image))
    form_to_bare = send(*bearer(token), "-F", f"file=@{image}", server.url + "/v1beta1/upload")
    clone = send(
        "-H",
        "X-CDI-Content-Type: filesystem-clone",
        *go_post_args(server.url + "/v1beta1/upload", token, image),
    )
    form_to_registry = send(
        *bearer(registry_token), "-F", f"file=@{image}", server.url + "/v1beta1/upload-form"
    )

    assert bare_to_form.code == 400
    assert "multipart/form-data" in bare_to_form.body["message"]
    assert form_to_bare.code == 400
    assert "/v1beta1/upload-form" in form_to_bare.body["message"]
    assert clone.code == 400
    assert "clone" in clone.body["message"]
    assert form_to_registry.code == 411
    assert "ContainerRegistry" in form_to_registry.body["message"]
    assert server.get("kinds")["status"]["phase"] == "WaitForUserUpload"
    assert server.get("registry")["status"]["phase"] == "WaitForUserUpload"
