"""Throughput of a streamed blob push through RegistryClient against `curl -T` of the same
bytes into one PATCH of the same registry, in the same run.

    python -m bench.measure_push [SIZE_MIB] [ROUNDS]
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.registry import Registry
from importer.oci.registry import RegistryClient

MiB = 1 << 20
READ = 4 * MiB


def make_file(path: Path, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for start in range(0, size, 64 * MiB):
            block = os.urandom(min(64 * MiB, size - start))
            digest.update(block)
            f.write(block)
    return "sha256:" + digest.hexdigest()


async def push_with_client(registry: Registry, path: Path, digest: str, repo: str) -> float:
    async with RegistryClient(registry.url) as client:
        start = time.perf_counter()
        upload = await client.start_blob_upload(repo)
        with open(path, "rb", buffering=0) as f:
            while block := f.read(READ):
                await upload.write(block)
        await upload.finish(digest)
        return time.perf_counter() - start


def push_with_curl(registry: Registry, path: Path, digest: str, repo: str, chunked: bool) -> float:
    start = time.perf_counter()
    headers = subprocess.run(
        [
            "curl",
            "-sS",
            "-f",
            "-D",
            "-",
            "-o",
            "/dev/null",
            "-X",
            "POST",
            f"{registry.url}/v2/{repo}/blobs/uploads/",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    location = next(
        line.split(" ", 1)[1].strip()
        for line in headers.splitlines()
        if line.lower().startswith("location:")
    )
    patch = [
        "curl",
        "-sS",
        "-f",
        "-D",
        "-",
        "-o",
        "/dev/null",
        "-X",
        "PATCH",
        "-H",
        "Content-Type: application/octet-stream",
        "-T",
        str(path),
        location,
    ]
    if chunked:
        patch[-1:-1] = ["-H", "Transfer-Encoding: chunked"]
    headers = subprocess.run(patch, check=True, capture_output=True, text=True).stdout
    location = next(
        line.split(" ", 1)[1].strip()
        for line in headers.splitlines()
        if line.lower().startswith("location:")
    )
    subprocess.run(
        ["curl", "-sS", "-f", "-o", "/dev/null", "-X", "PUT", f"{location}&digest={digest}"],
        check=True,
    )
    return time.perf_counter() - start


def cpu_seconds(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    size = int(sys.argv[1]) * MiB if len(sys.argv) > 1 else 1024 * MiB
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    speeds: dict[str, list[float]] = {"client": [], "curl -T": []}
    cpu: dict[str, float] = {"client": 0.0, "curl -T": 0.0}
    with tempfile.TemporaryDirectory(prefix="measure-push-") as tmp:
        root = Path(tmp)
        path = root / "blob"
        digest = make_file(path, size)
        with Registry(root / "registry") as registry:
            # Warm-up: afterwards every round commits a blob the registry already has.
            asyncio.run(push_with_client(registry, path, digest, "warm/up"))
            for round_ in range(rounds):
                order = ["client", "curl -T"] if round_ % 2 else ["curl -T", "client"]
                for name in order:
                    before = (
                        cpu_seconds(resource.RUSAGE_SELF),
                        cpu_seconds(resource.RUSAGE_CHILDREN),
                    )
                    if name == "client":
                        repo = f"client/r{round_}"
                        seconds = asyncio.run(push_with_client(registry, path, digest, repo))
                    else:
                        repo = f"curl/r{round_}"
                        seconds = push_with_curl(registry, path, digest, repo, chunked=False)
                    after = cpu_seconds(resource.RUSAGE_SELF), cpu_seconds(resource.RUSAGE_CHILDREN)
                    cpu[name] += sum(after) - sum(before)
                    speeds[name].append(size / seconds / 1e6)
                    print(f"round {round_} {name:8s} {speeds[name][-1]:6.1f} MB/s", flush=True)
    print(f"{size // MiB} MiB x {rounds} rounds, alternating order")
    for name, values in speeds.items():
        print(
            f"  {name:8s} median {statistics.median(values):6.1f} MB/s, best {max(values):6.1f},"
            f" sender CPU {cpu[name] / rounds:.2f} s per push"
        )
    ratio = statistics.median(speeds["client"]) / statistics.median(speeds["curl -T"])
    print(f"  client / curl -T (medians): {ratio:.2f}x")


if __name__ == "__main__":
    main()
