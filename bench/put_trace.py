"""The path of one `PUT` through the server's code: how many functions it passes, in how
many files, and how often it comes back to a file it had already left.

    python -m bench.put_trace [--checkout PATH] [--size MIB]

The server (from this checkout, or from PATH's `importer/` and `uploader/`) runs with a
profiler that records, from the moment the upload handler is called until it returns, the
first call of every project function, in every thread (the lanes included). The path is
that sequence: a *stop* is a function, a *return* is a move into a file the path had
already left. A *call back up* is a call into a file that is further up the calling stack
than the caller's own (a lower layer reaching into one above it, or a callback). A measure
of structure, not of speed: it shows whether a request goes down through the layers or
bounces between them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from bench.process import free_port

_PROFILED_SERVER = r"""
import json, os, sys, threading
root = os.path.realpath(sys.argv[1])
out = sys.argv[2]
sys.argv = ["dvcr-uploader", *sys.argv[3:]]
seen, path, reentries, state = set(), [], [], {"on": False, "frame": None}
PUT_FILES = ("uploader/upload.py", "uploader/server/upload_api.py")

files = {}

def project_file(filename):
    rel = files.get(filename)
    if rel is None:
        name = os.path.realpath(filename)
        rel = name[len(root) + 1:] if name.startswith(root + os.sep) else ""
        if not rel.startswith(("importer/", "uploader/")):
            rel = ""
        files[filename] = rel
    return rel

def profile(frame, event, arg):
    code = frame.f_code
    rel = project_file(code.co_filename)
    if not rel:
        return
    if event == "call" and not state["on"] and code.co_name == "put" and rel in PUT_FILES:
        state["on"], state["frame"] = True, frame
    if event == "call" and state["on"]:
        key = (rel, code.co_qualname)
        if key not in seen:
            seen.add(key)
            path.append(key)
        # A call back into a file further up this stack than the caller's own.
        caller = frame.f_back
        caller_file = project_file(caller.f_code.co_filename) if caller else ""
        if caller_file and caller_file != rel:
            up = caller.f_back
            while up is not None:
                if project_file(up.f_code.co_filename) == rel:
                    back = (caller_file, caller.f_code.co_qualname, rel, code.co_qualname)
                    if back not in seen:
                        seen.add(back)
                        reentries.append(back)
                    break
                up = up.f_back
    elif event == "return" and frame is state["frame"]:
        # Each suspension of the handler returns too; the last write is the whole path.
        with open(out, "w") as f:
            json.dump({"path": path, "reentries": reentries}, f)

threading.setprofile(profile)
sys.setprofile(profile)
from uploader.cli import main
sys.exit(main())
"""


def _request(url: str, method: str = "GET", body: bytes | None = None) -> dict[str, object]:
    request = urllib.request.Request(url, data=body, method=method)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, object] = json.loads(response.read() or b"{}")
        return answer


def trace(checkout: Path, size: int, work: Path) -> dict[str, list[list[str]]]:
    port = free_port()
    out = work / "path.json"
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    argv = [
        sys.executable,
        "-c",
        _PROFILED_SERVER,
        str(checkout),
        str(out),
        "serve",
        "--listen",
        f"127.0.0.1:{port}",
        "--data-dir",
        str(work / "data"),
    ]
    log = (work / "server.log").open("wb")
    server = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1).close()
                break
            except OSError as exc:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(
                        f"the server did not start; see {work / 'server.log'}"
                    ) from exc
                time.sleep(0.1)
        manifest = {
            "apiVersion": "virtualization.deckhouse.io/v1alpha2",
            "kind": "VirtualImage",
            "metadata": {"name": "traced"},
            "spec": {"storage": "PersistentVolumeClaim", "dataSource": {"type": "Upload"}},
        }
        created = _request(
            base + "/apis/virtualization.deckhouse.io/v1alpha2/namespaces/default/virtualimages",
            "POST",
            json.dumps(manifest).encode(),
        )
        status = created["status"]
        assert isinstance(status, dict)
        upload_url = status["imageUploadURLs"]["external"]
        image = work / "disk.qcow2"
        raw = work / "disk.raw"
        with raw.open("wb") as f:
            f.write(os.urandom(1 << 20) * (size // (1 << 20)))
        subprocess.run(
            ["qemu-img", "convert", "-O", "qcow2", str(raw), str(image)],
            check=True,
        )
        subprocess.run(
            ["curl", "-sS", "-f", "-o", "/dev/null", "-T", str(image), upload_url], check=True
        )
        deadline = time.monotonic() + 30
        while not out.exists():
            if time.monotonic() > deadline:
                raise RuntimeError("the profiled server wrote no path")
            time.sleep(0.1)
        time.sleep(0.2)
        return json.loads(out.read_text())  # type: ignore[no-any-return]
    finally:
        server.terminate()
        server.wait(30)
        log.close()


def summary(path: list[list[str]], reentries: list[list[str]]) -> dict[str, object]:
    files: list[str] = []
    returns = 0
    entries: Counter[str] = Counter()
    left: set[str] = set()
    previous = None
    for file, _ in path:
        if file != previous:
            entries[file] += 1
            if file in left:
                returns += 1
            if previous is not None:
                left.add(previous)
            previous = file
        if file not in files:
            files.append(file)
    return {
        "stops": len(path),
        "files": len(files),
        "returns": returns,
        "most entered": entries.most_common(3),
        "calls back up the stack": len(reentries),
    }


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.put_trace", description=__doc__)
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--size", type=int, default=64, help="image size in MiB (qcow2)")
    parser.add_argument("--show", action="store_true", help="print the path itself")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="put-trace-") as tmp:
        traced = trace(args.checkout.resolve(), args.size << 20, Path(tmp))
    path, reentries = traced["path"], traced["reentries"]
    if args.show:
        for file, name in path:
            print(f"  {file}: {name}")
        print("calls back into a file further up the stack:")
        for caller_file, caller, file, name in reentries:
            print(f"  {caller_file}: {caller} -> {file}: {name}")
    print(json.dumps(summary(path, reentries), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
