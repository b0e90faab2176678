"""One upload of the source file sent several times over, without a file that size on disk:
`cat SOURCE SOURCE ... | curl -T -`. curl would send a body from a pipe chunked, and a
ContainerRegistry image needs its length before the first byte, so the request says it:
`Content-Length` set, `Transfer-Encoding` taken out."""

from __future__ import annotations

import hashlib
import json
import subprocess

from bench.contenders import RunFailed, Sample, dns_name, labelled
from bench.curl import CurlFailed, finish_put, start_put
from bench.ours import OurServer
from bench.procstat import Sampler
from bench.units import MiB
from bench.workdir import SourceFile, settle


def repeated_sha256(source: SourceFile, copies: int) -> str:
    sha256 = hashlib.sha256()
    buf = bytearray(4 * MiB)
    for _ in range(copies):
        with open(source.path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                sha256.update(memoryview(buf)[:n])
    return sha256.hexdigest()


class OurRepeatedUpload:
    """`copies` times the source in one upload into a new image of our server."""

    def __init__(
        self,
        server: OurServer,
        source: SourceFile,
        prefix: str,
        copies: int,
        storage: str,
        label: str = "",
    ) -> None:
        self.server = server
        self.source = source
        self.copies = copies
        self.storage = storage
        self.prefix, self.name = labelled(prefix, label)
        self.series = (self.name,)
        self.size = copies * source.size
        self.response = server.data_dir.parent / f"{self.prefix}-response.json"
        self._sha256: str | None = None

    def run(self, tag: str) -> Sample:
        if self._sha256 is None:
            self._sha256 = repeated_sha256(self.source, self.copies)
        name = dns_name(f"bench-{self.prefix}-{tag}")
        url = self.server.create_upload(name, self.storage)
        headers = ("Transfer-Encoding:", f"Content-Length: {self.size}")
        try:
            with Sampler(self.server.pid) as sampler:
                cat = subprocess.Popen(
                    ["cat", *[str(self.source.path)] * self.copies], stdout=subprocess.PIPE
                )
                try:
                    curl = start_put(None, url, self.response, headers, stdin=cat.stdout)
                    assert cat.stdout is not None
                    cat.stdout.close()  # curl holds the pipe now
                    result = finish_put(curl, url, self.response)
                finally:
                    if cat.poll() is None:
                        cat.kill()
                    cat.wait()
            self._check(result.code, result.body)
        except CurlFailed as exc:
            raise RunFailed(str(exc)) from None
        finally:
            self.server.delete(name)
            settle()
        return Sample({self.name: result.seconds}, self.size, sampler.cpu(), sampler.peak_rss_kib)

    def _check(self, code: int, body: bytes) -> None:
        if code != 200:
            raise RunFailed(f"our server answered {code}: {body[:500]!r}")
        answer = json.loads(body)
        sha256 = (answer.get("checksum") or {}).get("sha256")
        if answer.get("phase") != "Ready" or sha256 != self._sha256:
            raise RunFailed(f"the image is not Ready with the data's sha256: {answer}")
