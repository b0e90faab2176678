"""Several uploads at once: one `curl -T` process per upload, all started together, all
sending the same file (both sides read it from the page cache). A run's time is from the
start of the first curl to the end of the last; its bytes are all the uploads' together."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench.contenders import RunFailed, Sample, dns_name, labelled, remove_empty
from bench.curl import CurlFailed, CurlResult, finish_put, start_put
from bench.nginx import Nginx
from bench.ours import OurServer
from bench.procstat import Sampler
from bench.workdir import SourceFile, fsync_path, settle


def nginx_series(count: int) -> tuple[str, str]:
    return f"{count} nginx PUTs", f"{count} nginx PUTs+fsync"


def _put_all(
    source: SourceFile, urls: list[str], responses: list[Path]
) -> tuple[list[CurlResult], float]:
    """Starts one curl per URL, waits for all; their answers and the wall time."""
    started = time.perf_counter()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for url, response in zip(urls, responses, strict=True):
            procs.append(start_put(source.path, url, response))
        results = [
            finish_put(proc, url, response)
            for proc, url, response in zip(procs, urls, responses, strict=True)
        ]
    except CurlFailed as exc:
        raise RunFailed(str(exc)) from None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results, time.perf_counter() - started


class OurParallelUploads:
    """`count` images of our server, created before the clock starts, each fed by its own
    curl at the same time."""

    def __init__(
        self, server: OurServer, source: SourceFile, prefix: str, count: int, label: str = ""
    ) -> None:
        self.server = server
        self.source = source
        self.count = count
        self.prefix, self.name = labelled(prefix, label)
        self.series = (self.name,)

    def run(self, tag: str) -> Sample:
        names = [dns_name(f"bench-{self.prefix}-{tag}-{i}") for i in range(self.count)]
        responses = [self.server.data_dir.parent / f"{name}-response.json" for name in names]
        try:
            urls = [self.server.create_upload(name) for name in names]
            with Sampler(self.server.pid) as sampler:
                results, seconds = _put_all(self.source, urls, responses)
            for name, result in zip(names, results, strict=True):
                self._check(name, result)
        finally:
            for name in names:
                self.server.delete(name)
            settle()
        nbytes = self.count * self.source.size
        return Sample({self.name: seconds}, nbytes, sampler.cpu(), sampler.peak_rss_kib)

    def _check(self, name: str, result: CurlResult) -> None:
        if result.code != 200:
            raise RunFailed(f"our server answered {result.code} for {name}: {result.body[:500]!r}")
        answer = json.loads(result.body)
        sha256 = (answer.get("checksum") or {}).get("sha256")
        if answer.get("phase") != "Ready" or sha256 != self.source.sha256:
            raise RunFailed(f"{name} is not Ready with the file's sha256: {answer}")


class NginxParallelPuts:
    """`count` WebDAV PUTs to nginx at the same time. As with one PUT, two figures: until
    the last answer, and until then all the files are also fsynced (one after the other,
    right after the last answer). nginx runs several workers here (`worker_processes
    auto`), so its CPU is not sampled: the per-thread figures follow one process."""

    name = "nginx"

    def __init__(self, nginx: Nginx, source: SourceFile, count: int) -> None:
        self.nginx = nginx
        self.source = source
        self.count = count
        self.series = nginx_series(count)

    def run(self, tag: str) -> Sample:
        targets = [self.nginx.target(f"{tag}/{i}/disk.img") for i in range(self.count)]
        responses = [self.nginx.prefix / f"response-{i}.txt" for i in range(self.count)]
        try:
            results, seconds = _put_all(self.source, [url for url, _ in targets], responses)
            for result in results:
                if result.code not in (201, 204):
                    raise RunFailed(f"nginx answered {result.code}: {result.body[:500]!r}")
            started = time.perf_counter()
            for _, path in targets:
                fsync_path(path)
            fsync = time.perf_counter() - started
            for _, path in targets:
                size = path.stat().st_size
                if size != self.source.size:
                    raise RunFailed(f"nginx stored {size} bytes of {self.source.size}")
        finally:
            for _, path in targets:
                path.unlink(missing_ok=True)
                remove_empty(path.parent, self.nginx.root)
            settle()
        put, put_fsync = self.series
        return Sample({put: seconds, put_fsync: seconds + fsync}, self.count * self.source.size)
