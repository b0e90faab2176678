"""The pod's `/metrics` as Deckhouse's controller scrapes it: HTTPS on a throwaway
self-signed certificate, the certificate not checked, Deckhouse's gauge names with the
`ownerUID` label."""

from __future__ import annotations

import re
import ssl
import subprocess
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID
from diskimages import MiB, write_disk_image
from podproc import OWNER_UID, UploaderPod, deckhouse_env
from registryproc import Registry
from serverproc import background_upload, head_offset
from waiting import wait_until

ENDPOINT_PATH = "vi/team-a/metrics:5d1f0c2e-8b7a-4e3c-9f61-2a4b6c8d0e13"


def _scrape(url: str, *curl_args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "--max-time", "5", *curl_args, url],
        capture_output=True,
        text=True,
        timeout=10,
    )


def _gauge(text: str, name: str) -> float:
    match = re.search(rf'^{name}{{ownerUID="{OWNER_UID}"}} (\S+)$', text, re.MULTILINE)
    assert match is not None, f"{name} is not in {text[:2000]}"
    return float(match.group(1))


def test_metrics_are_served_over_https_with_a_self_signed_certificate(
    tmp_path: Path, registry: Registry
) -> None:
    with UploaderPod(tmp_path / "pod", deckhouse_env(f"{registry.host}/{ENDPOINT_PATH}")) as pod:
        url = f"https://127.0.0.1:{pod.metrics_port}/metrics"
        scraped = _scrape(url, "-k", "--fail")
        assert scraped.returncode == 0, scraped.stderr
        assert "# TYPE dvcr_active_transfers gauge" in scraped.stdout
        # Without -k the certificate is not trusted: nobody signed it.
        unverified = _scrape(url, "--fail")
        assert unverified.returncode == 60, unverified.stderr  # CURLE_PEER_FAILED_VERIFICATION
        plain = _scrape(f"http://127.0.0.1:{pod.metrics_port}/metrics", "--fail")
        assert plain.returncode != 0  # no plain HTTP on the TLS port
        pem = ssl.get_server_certificate(("127.0.0.1", pod.metrics_port), timeout=5)
        certificate = x509.load_pem_x509_certificate(pem.encode())
        assert certificate.subject == certificate.issuer  # self-signed
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        assert [n.value for n in names] == ["dvcr-uploader-metrics"]
        # The key was loaded and its file removed: only the state database is left.
        (state,) = pod.tmpdir.iterdir()
        assert not [p for p in state.rglob("*") if p.suffix in (".key", ".crt")]
        # /healthz stays plain HTTP on its own port (the readiness probe).
        assert pod.healthy()


def test_deckhouse_gauges_during_an_upload(tmp_path: Path, registry: Registry) -> None:
    disk = tmp_path / "disk.raw"
    write_disk_image(disk, 8 * MiB, seed=5)
    with UploaderPod(tmp_path / "pod", deckhouse_env(f"{registry.host}/{ENDPOINT_PATH}")) as pod:
        slow = background_upload(disk, pod.url + "/upload", rate="1M")
        try:
            wait_until(lambda: head_offset(f"{pod.url}/upload") > MiB, timeout=20, what="bytes")

            def reported() -> bool:
                text = pod.metrics()
                return (
                    'registry_progress{ownerUID="' in text and _gauge(text, "registry_progress") > 0
                )

            wait_until(reported, timeout=10, what="the progress gauge")
            text = pod.metrics()
            assert 0 < _gauge(text, "registry_progress") < 100
            assert _gauge(text, "registry_average_speed") > 0
            _gauge(text, "registry_current_speed")  # present, whatever its value
            assert "dvcr_active_transfers 1.0" in text
        finally:
            slow.kill()
            slow.wait()
