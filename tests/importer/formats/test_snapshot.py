"""Snapshots of a decoder and its PVC target: a conversion is cut at a random point and
killed, a new process restores it on the reopened claim and feeds the rest, and the disk
is the very one an uninterrupted conversion (and qemu-img) makes."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import lzma
import os
import pickle
import random
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import zstandard
from diskimages import make_iso, qemu_convert, sha256_file, write_disk_image
from feeding import random_pieces
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vfmt_helpers import vmware_stream_vmdk

from importer.formats import snapshot as snapshot_module
from importer.formats.base import Limits
from importer.formats.decoder import ImageDecoder
from importer.formats.snapshot import (
    restore_decoder,
    snapshot_decoder,
    spill_files,
    state_metadata,
)
from importer.formats.spillfile import SpillFile
from importer.sinks.pvc import BlockClaimTarget, FileClaimTarget, PvcSink

MiB = 1 << 20
KiB = 1 << 10
BASE_SIZE = 20 * MiB
SPILL_MEMORY = 64 * KiB
CAPACITY = 1 << 30
REPO = Path(__file__).resolve().parents[3]


# -- images -------------------------------------------------------------------------------


def _base(path: Path) -> Path:
    """Random data, written zeros and holes in MiB runs, plus lone sectors of data in the
    holes, so that partial blocks and grains show up in every format."""
    write_disk_image(path, BASE_SIZE, seed=11)
    rnd = random.Random(11)
    with open(path, "r+b") as f:
        for _ in range(24):
            f.seek(rnd.randrange(0, BASE_SIZE // 512) * 512)
            f.write(rnd.randbytes(512))
    return path


def _qemu(fmt: str, *options: str) -> Callable[[Path, Path], Path]:
    return lambda base, dst: qemu_convert(base, fmt, dst, *options)


def _qcow2_resized(base: Path, dst: Path) -> Path:
    """512-byte clusters, grown: the L1 table moves to the end, after everything it maps,
    so that all the data waits in the spill (mostly in its side file)."""
    qemu_convert(base, "qcow2", dst, "-o", "cluster_size=512")
    _run("qemu-img", "resize", "-f", "qcow2", str(dst), str(BASE_SIZE + 4 * MiB))
    _run("qemu-io", "-f", "qcow2", "-c", f"write -P 0x77 {BASE_SIZE + MiB} 1M", str(dst))
    _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x78 100k 3k", str(dst))
    return dst


def _vdi_map_last(base: Path, dst: Path) -> Path:
    """A VDI whose block map follows the data blocks: the layout spill holds them."""
    image = bytearray(qemu_convert(base, "vdi", dst).read_bytes())
    (map_offset,) = struct.unpack_from("<I", image, 0x154)
    (count,) = struct.unpack_from("<I", image, 0x180)
    table = image[map_offset : map_offset + 4 * count]
    image += bytes(-len(image) % 512)
    struct.pack_into("<I", image, 0x154, len(image))
    image += table
    dst.write_bytes(image)
    return dst


def _vmware_stream(base: Path, dst: Path) -> Path:
    """streamOptimized as VMware writes it: grain tables and directory after the grains."""
    dst.write_bytes(vmware_stream_vmdk(base.read_bytes()))
    return dst


def _iso(_base: Path, dst: Path) -> Path:
    (dst.parent / "iso-build").mkdir()
    shutil.copy(make_iso(dst.parent / "iso-build"), dst)
    return dst


def _tar_qcow2(base: Path, dst: Path) -> Path:
    qcow2 = qemu_convert(base, "qcow2", dst.with_suffix(".qcow2"))
    with tarfile.open(dst, "w") as tar:
        tar.add(qcow2, arcname="disk.qcow2")
    return dst


def _xz_blocks_qcow2(base: Path, dst: Path) -> Path:
    """A qcow2 compressed by `xz -T2` into 1 MiB blocks that give their sizes: decoded on
    worker threads, and saved in the middle of a block as well as between blocks."""
    qcow2 = qemu_convert(base, "qcow2", dst.with_suffix(".qcow2"))
    with open(dst, "wb") as out:
        subprocess.run(["xz", "-T2", "--block-size=1MiB", "-c", str(qcow2)], stdout=out, check=True)
    return dst


def _raw(base: Path, dst: Path) -> Path:
    shutil.copy(base, dst)
    return dst


# name: (how to make it, qemu-img's name of the format, what the decoder reports)
VARIANTS: dict[str, tuple[Callable[[Path, Path], Path], str, str]] = {
    "raw": (_raw, "raw", "raw"),
    "qcow2": (_qemu("qcow2"), "qcow2", "qcow2"),
    "qcow2-compressed": (_qemu("qcow2", "-c"), "qcow2", "qcow2"),
    "qcow2-resized": (_qcow2_resized, "qcow2", "qcow2"),
    "vmdk-sparse": (_qemu("vmdk", "-o", "subformat=monolithicSparse"), "vmdk", "vmdk"),
    "vmdk-stream": (_qemu("vmdk", "-o", "subformat=streamOptimized"), "vmdk", "vmdk"),
    "vmdk-vmware-stream": (_vmware_stream, "vmdk", "vmdk"),
    "vdi": (_qemu("vdi"), "vdi", "vdi"),
    "vdi-map-last": (_vdi_map_last, "vdi", "vdi"),
    "vhd": (_qemu("vpc"), "vpc", "vhd"),
    "vhd-fixed": (_qemu("vpc", "-o", "subformat=fixed"), "vpc", "vhd"),
    "vhdx": (_qemu("vhdx"), "vhdx", "vhdx"),
    "iso": (_iso, "raw", "iso"),
    "tar-qcow2": (_tar_qcow2, "qcow2", "qcow2"),
    "qcow2-xz-blocks": (_xz_blocks_qcow2, "qcow2", "qcow2"),
}
SPILLING = ("qcow2-resized", "vdi-map-last")


class Reference:
    """An image and the disk an uninterrupted conversion makes of it."""

    def __init__(self, image: Path, sha256: str, size: int, blocks: int, written: int) -> None:
        self.image = image
        self.sha256 = sha256
        self.size = size
        self.blocks = blocks
        self.written = written


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("snapshot")


@pytest.fixture(scope="session")
def base(workdir: Path) -> Path:
    return _base(workdir / "base.raw")


@pytest.fixture(scope="session")
def reference(workdir: Path, base: Path) -> Callable[[str], Reference]:
    made: dict[str, Reference] = {}

    def get(name: str) -> Reference:
        if name not in made:
            make, qemu_format, _ = VARIANTS[name]
            folder = workdir / name
            folder.mkdir()
            image = make(base, folder / "image")
            # what qemu makes of it
            qemu_raw = folder / "qemu.raw"
            wrapped = folder / "image.qcow2"  # what a wrapped image holds
            source = wrapped if wrapped.exists() else image
            _run("qemu-img", "convert", "-f", qemu_format, "-O", "raw", str(source), str(qemu_raw))
            # and an uninterrupted conversion
            claim = folder / "claim"
            target = FileClaimTarget(claim, capacity=CAPACITY)
            sink = PvcSink(target, ImageDecoder(target, _limits(folder / "spill")))
            data = memoryview(image.read_bytes())
            _feed(sink, data, _bounds(data, name), len(data))
            sink.decode.finish()
            target.commit(sink.image_info().virtual_size)
            disk = claim / "disk.img"
            assert sha256_file(disk) == sha256_file(qemu_raw)
            made[name] = Reference(
                image, sha256_file(disk), disk.stat().st_size, disk.stat().st_blocks, target.written
            )
        return made[name]

    return get


# -- feeding as the pipeline does, and the two processes -----------------------------------


def _limits(spill_dir: Path) -> Limits:
    spill_dir.mkdir(parents=True, exist_ok=True)
    return Limits(spill_memory=SPILL_MEMORY, spill_dir=str(spill_dir))


def _bounds(data: memoryview, seed: object) -> list[int]:
    """Where the pieces of a stream begin and end: random sizes, but the same in every
    run of one image, as the pipeline's blocks are (where a write is cut decides which
    zero runs become holes, and so the target's counters)."""
    bounds = [0]
    for piece in random_pieces(data, random.Random(seed), big=MiB):
        bounds.append(bounds[-1] + len(piece))
    return bounds


def _feed(sink: PvcSink, data: memoryview, bounds: list[int], until: int) -> None:
    """The pieces from where the sink stands up to `until` (a bound), through a reused
    buffer scribbled over after each call, so that a decoder that kept a view of it would
    go wrong."""
    scratch = bytearray(MiB)
    i = bounds.index(sink.decode.offset)
    while bounds[i] < until:
        n = bounds[i + 1] - bounds[i]
        scratch[:n] = data[bounds[i] : bounds[i + 1]]
        sink.decode.update(memoryview(scratch)[:n])
        scratch[:n] = b"\xa5" * n
        i += 1
    assert sink.decode.offset == until


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, check=True, capture_output=True, text=True)


def _worker(mode: str, image: str, folder: str, name: str, cut: str, more: str) -> None:
    """The server's side, in its own process. `start`: feed the image up to `cut`, store
    a snapshot, go on to `more`, then die at once (SIGKILL: nothing closed or cleaned up).
    `resume`: restore the stored snapshot and feed the rest; prints what it made."""
    data = memoryview(Path(image).read_bytes())
    bounds = _bounds(data, name)
    work = Path(folder)
    limits = _limits(work / "spill")
    if mode == "start":
        target = FileClaimTarget(work / "claim", capacity=CAPACITY)
        sink = PvcSink(target, ImageDecoder(target, limits))
        _feed(sink, data, bounds, int(cut))
        state = sink.snapshot()
        assert state is not None
        (work / "state.tmp").write_bytes(state)
        os.replace(work / "state.tmp", work / "state")
        _feed(sink, data, bounds, int(more))
        os.kill(os.getpid(), signal.SIGKILL)
    state = (work / "state").read_bytes()
    sink = PvcSink.resume(state, work / "claim", limits)
    offset = sink.decode.offset
    _feed(sink, data, bounds, len(data))
    sink.decode.finish()
    info = sink.image_info()
    sink.target.commit(info.virtual_size)
    print(json.dumps({"offset": offset, "format": info.format, "written": sink.target.written}))


def _in_new_process(*args: str) -> subprocess.CompletedProcess[str]:
    here = Path(__file__).parent
    code = (
        f"import sys; sys.path[1:1] = [{str(here)!r}, {str(REPO / 'tests')!r}]; "
        "from test_snapshot import _worker; _worker(*sys.argv[1:])"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, env=env
    )


def _same_disk(disk: Path, ref: Reference) -> None:
    assert disk.stat().st_size == ref.size
    assert sha256_file(disk) == ref.sha256
    # the same holes: what the file takes on disk, give or take the filesystem's rounding
    assert abs(disk.stat().st_blocks - ref.blocks) <= 1024, (disk.stat().st_blocks, ref.blocks)


# -- every format, cut and killed, resumed in a new process ---------------------------------


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_resumes_after_a_crash(
    name: str, seed: int, reference: Callable[[str], Reference], tmp_path: Path
) -> None:
    ref = reference(name)
    bounds = _bounds(memoryview(ref.image.read_bytes()), name)
    rnd = random.Random(f"{name}-{seed}")
    at = rnd.randrange(1, max(2, len(bounds) - 1))
    cut, more = bounds[at], bounds[min(len(bounds) - 1, at + rnd.randrange(0, 4))]
    args = (str(ref.image), str(tmp_path), name, str(cut), str(more))

    started = _in_new_process("start", *args)
    assert started.returncode == -signal.SIGKILL, started.stderr
    state = (tmp_path / "state").read_bytes()
    for path in spill_files(state):
        assert Path(path).parent == tmp_path / "spill"

    resumed = _in_new_process("resume", *args)
    assert resumed.returncode == 0, resumed.stderr
    made = json.loads(resumed.stdout)
    assert made == {"offset": cut, "format": VARIANTS[name][2], "written": ref.written}
    _same_disk(tmp_path / "claim" / "disk.img", ref)
    assert not (tmp_path / "claim" / ".disk.img.partial").exists()


@pytest.mark.parametrize("name", SPILLING)
def test_spill_file_is_kept_and_reopened(
    name: str, reference: Callable[[str], Reference], tmp_path: Path
) -> None:
    """Data waiting in the spill's side file when the snapshot is taken: the file is
    synced and kept under its name, and the restored decoder reads it back."""
    ref = reference(name)
    data = memoryview(ref.image.read_bytes())
    bounds = _bounds(data, name)
    limits = _limits(tmp_path / "spill")
    target = FileClaimTarget(tmp_path / "claim", capacity=CAPACITY)
    sink = PvcSink(target, ImageDecoder(target, limits))
    at = len(bounds) * 2 // 3
    cut = bounds[at]
    _feed(sink, data, bounds, cut)
    state = sink.snapshot()
    assert state is not None
    [(kept, size)] = [(e["path"], e["size"]) for e in state_metadata(state)["spill_files"]]
    assert size > MiB and os.path.getsize(kept) == size
    # the first process goes on, appends to the file, is aborted and cleans up: the file
    # the snapshot needs stays
    _feed(sink, data, bounds, bounds[at + 3])
    assert os.path.getsize(kept) > size
    sink.decode.close()
    target.close()
    assert os.path.exists(kept)

    resumed = PvcSink.resume(state, tmp_path / "claim", limits)
    _feed(resumed, data, bounds, len(data))
    resumed.decode.finish()
    resumed.target.commit(resumed.image_info().virtual_size)
    _same_disk(tmp_path / "claim" / "disk.img", ref)
    assert resumed.target.written == ref.written
    # the finished decoder let go of the file but left it: the snapshot's keeper deletes it
    assert spill_files(state) == [kept] and os.path.exists(kept)
    for path in spill_files(state):
        os.unlink(path)
    assert list((tmp_path / "spill").iterdir()) == []


def test_snapshots_leave_the_decoder_going(
    reference: Callable[[str], Reference], tmp_path: Path
) -> None:
    """A snapshot after every piece changes nothing for the decoder that goes on."""
    ref = reference("qcow2-resized")
    data = memoryview(ref.image.read_bytes())
    limits = _limits(tmp_path / "spill")
    target = FileClaimTarget(tmp_path / "claim", capacity=CAPACITY)
    sink = PvcSink(target, ImageDecoder(target, limits))
    kept: set[str] = set()
    sizes = []
    for bound in _bounds(data, "qcow2-resized")[1:]:
        sink.decode.update(data[sink.decode.offset : bound])
        state = sink.snapshot()
        assert state is not None
        sizes.append(len(state))
        kept.update(spill_files(state))
    sink.decode.finish()
    target.commit(sink.image_info().virtual_size)
    _same_disk(target.path, ref)
    assert target.written == ref.written
    assert kept and max(sizes) < SPILL_MEMORY + 64 * KiB
    assert {str(path) for path in (tmp_path / "spill").iterdir()} == kept


@pytest.mark.parametrize("where", ["middle", "end"])
@pytest.mark.parametrize("name", ["qcow2", "vhdx"])
def test_block_claim(
    name: str, where: str, reference: Callable[[str], Reference], tmp_path: Path
) -> None:
    """A block claim (here a pre-sized file full of old data, which must read as zeros
    wherever the image has none) is reopened in place; cut halfway, or after the last
    byte (nothing more is written, `finish` and the commit remain)."""
    ref = reference(name)
    data = memoryview(ref.image.read_bytes())
    device = tmp_path / "device"
    device.write_bytes(b"\xee" * (ref.size + MiB))
    bounds = _bounds(data, name)
    limits = _limits(tmp_path / "spill")
    target = BlockClaimTarget(device)
    sink = PvcSink(target, ImageDecoder(target, limits))
    at = len(bounds) // 2 if where == "middle" else len(bounds) - 1
    _feed(sink, data, bounds, bounds[at])
    state = sink.snapshot()
    assert state is not None
    _feed(sink, data, bounds, bounds[min(at + 2, len(bounds) - 1)])
    target.close()

    resumed = PvcSink.resume(state, device, limits)
    _feed(resumed, data, bounds, len(data))
    resumed.decode.finish()
    resumed.target.commit(resumed.image_info().virtual_size)
    content = device.read_bytes()
    assert hashlib.sha256(content[: ref.size]).hexdigest() == ref.sha256
    assert content[ref.size :] == bytes(MiB)
    assert resumed.target.written == ref.written

    with open(device, "r+b") as f:
        f.truncate(ref.size)
    with pytest.raises(ValueError, match="holds"):
        PvcSink.resume(state, device, limits)


# -- hypothesis over cut points -------------------------------------------------------------


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    name=st.sampled_from(["raw", "qcow2", "qcow2-compressed", "qcow2-resized", "qcow2-xz-blocks"]),
    cuts=st.lists(st.floats(0, 1), min_size=1, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_any_cut_points(
    name: str,
    cuts: list[float],
    seed: int,
    reference: Callable[[str], Reference],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Snapshot, drop, restore on a reopened target, again and again: the same disk."""
    ref = reference(name)
    data = memoryview(ref.image.read_bytes())
    bounds = _bounds(data, name)
    work = tmp_path_factory.mktemp("cuts")
    rnd = random.Random(seed)
    limits = _limits(work / "spill")
    target = FileClaimTarget(work / "claim", capacity=CAPACITY)
    sink = PvcSink(target, ImageDecoder(target, limits))
    states = []
    for at in sorted(int(c * (len(bounds) - 1)) for c in cuts):
        _feed(sink, data, bounds, bounds[at])
        state = sink.snapshot()
        assert state is not None
        states.append(state)
        # the process goes on a little, then is gone
        _feed(sink, data, bounds, bounds[min(len(bounds) - 1, at + rnd.randrange(0, 3))])
        sink.target.close()
        del sink
        sink = PvcSink.resume(state, work / "claim", limits)
        assert sink.decode.offset == bounds[at]
    _feed(sink, data, bounds, len(data))
    sink.decode.finish()
    sink.target.commit(sink.image_info().virtual_size)
    _same_disk(work / "claim" / "disk.img", ref)
    assert sink.target.written == ref.written
    for path in {path for state in states for path in spill_files(state)}:
        os.unlink(path)
    shutil.rmtree(work)


# -- what cannot be saved -------------------------------------------------------------------

COMPRESSORS: dict[str, Callable[[bytes], bytes]] = {
    "gzip": gzip.compress,
    "xz": lambda data: lzma.compress(data, preset=0),  # one block, its sizes not given
    "bzip2": lambda data: bz2.compress(data, 1),
    "zstd": lambda data: zstandard.ZstdCompressor().compress(data),
}


@pytest.mark.parametrize("wrapper", list(COMPRESSORS))
def test_compressed_streams_cannot_be_saved(
    wrapper: str, reference: Callable[[str], Reference], tmp_path: Path
) -> None:
    ref = reference("qcow2")
    data = memoryview(COMPRESSORS[wrapper](ref.image.read_bytes()))
    bounds = _bounds(data, wrapper)
    limits = _limits(tmp_path / "spill")
    target = FileClaimTarget(tmp_path / "claim", capacity=CAPACITY)
    sink = PvcSink(target, ImageDecoder(target, limits))
    _feed(sink, data, bounds, bounds[len(bounds) // 2])
    assert sink.snapshot() is None
    assert snapshot_decoder(sink.decode.decoder) is None  # type: ignore[arg-type]
    # and the transfer goes on unharmed
    _feed(sink, data, bounds, len(data))
    sink.decode.finish()
    assert sink.image_info().wrappers == (wrapper,)
    target.commit(sink.image_info().virtual_size)
    _same_disk(target.path, ref)
    assert list((tmp_path / "spill").iterdir()) == []


# -- states that are refused ----------------------------------------------------------------


def _halfway(ref: Reference, name: str, work: Path) -> tuple[bytes, Limits]:
    """A state of a conversion halfway through the image, its claim and spill in `work`."""
    data = memoryview(ref.image.read_bytes())
    limits = _limits(work / "spill")
    target = FileClaimTarget(work / "claim", capacity=CAPACITY)
    sink = PvcSink(target, ImageDecoder(target, limits))
    bounds = _bounds(data, name)
    _feed(sink, data, bounds, bounds[len(bounds) // 2])
    state = sink.snapshot()
    assert state is not None
    target.close()
    return state, limits


@pytest.fixture
def saved(reference: Callable[[str], Reference], tmp_path: Path) -> tuple[bytes, Limits]:
    """A state of a qcow2 conversion halfway, whose spill has a side file."""
    state, limits = _halfway(reference("qcow2-resized"), "qcow2-resized", tmp_path)
    assert spill_files(state)
    return state, limits


def _resign(body: bytes) -> bytes:
    """A state with a valid digest over `body` (the digest guards against accidents, it
    is no signature)."""
    return body + hashlib.sha256(body).digest()


def _with_payload(state: bytes, payload: bytes) -> bytes:
    (meta_length,) = struct.unpack_from(">I", state, 10)
    return _resign(state[: 14 + meta_length] + payload)


def test_refuses_corrupt_and_foreign_states(saved: tuple[bytes, Limits], tmp_path: Path) -> None:
    state, limits = saved
    rnd = random.Random(9)
    bad = [
        b"",
        b"hello",
        pickle.dumps(ImageDecoder),
        state[:-1],
        state[: len(state) // 2],
        state + b"\0",
        _resign(state[:10] + b"\xff\xff\xff\xff" + state[14:-32]),  # metadata length
        _resign(state[:10] + struct.pack(">I", 2) + b"[]"),  # metadata that is no object
        _with_payload(state, b"not a pickle"),
        _with_payload(state, pickle.dumps({"a": 1})),
    ]
    for _ in range(20):
        flipped = bytearray(state)
        flipped[rnd.randrange(len(flipped))] ^= 1 << rnd.randrange(8)
        bad.append(bytes(flipped))
    for blob in bad:
        target = FileClaimTarget.reopen(tmp_path / "claim", CAPACITY, _target_state(state))
        with pytest.raises(ValueError):
            restore_decoder(blob, target, limits)
        target.close()
        with pytest.raises(ValueError):
            PvcSink.resume(blob, tmp_path / "claim", limits)


def test_refuses_another_version(saved: tuple[bytes, Limits], tmp_path: Path) -> None:
    state, limits = saved
    other = _resign(state[:8] + struct.pack(">H", 2) + state[10:-32])
    with pytest.raises(ValueError, match="version 2"):
        PvcSink.resume(other, tmp_path / "claim", limits)


def test_refuses_a_state_of_other_code(
    saved: tuple[bytes, Limits], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state, limits = saved
    monkeypatch.setattr(snapshot_module, "code_fingerprint", lambda: "changed")
    with pytest.raises(ValueError, match="another version of the converters"):
        PvcSink.resume(state, tmp_path / "claim", limits)


def test_a_state_names_nothing_but_decoder_state(
    saved: tuple[bytes, Limits], tmp_path: Path
) -> None:
    state, limits = saved
    touched = tmp_path / "touched"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return os.system, (f"touch {touched}",)

    class Opener:
        """A public method of one of the package's objects (here one that would open any
        file for writing)."""

        def __reduce__(self) -> tuple[object, tuple[object, str]]:
            return snapshot_module._bound_method, (SpillFile(None), "reopen")

    for payload in (
        pickle.dumps(Evil()),
        pickle.dumps(Opener()),
        pickle.dumps(getattr),
        b"cimporter.formats.spillfile\nos\n.",  # a module a converter imports
        b"cimporter.formats.spillfile\ntempfile\n.",
    ):
        with pytest.raises(ValueError):
            PvcSink.resume(_with_payload(state, payload), tmp_path / "claim", limits)
    assert not touched.exists()


def test_refuses_when_the_data_is_gone(
    saved: tuple[bytes, Limits], reference: Callable[[str], Reference], tmp_path: Path
) -> None:
    state, limits = saved
    claim = tmp_path / "claim"
    # a spill file it needs is gone
    [spill] = spill_files(state)
    os.rename(spill, spill + ".moved")
    with pytest.raises(ValueError, match="spill file"):
        PvcSink.resume(state, claim, limits)
    os.rename(spill + ".moved", spill)
    sink = PvcSink.resume(state, claim, limits)  # all there again: it restores
    assert sink.decode.offset > 0
    sink.target.close()

    # the partial file of a conversion that wrote data: replaced by a new one, or gone
    written, limits = _halfway(reference("qcow2"), "qcow2", tmp_path / "written")
    claim = tmp_path / "written" / "claim"
    assert _target_state(written)["size"]
    (claim / ".disk.img.partial").rename(claim / "moved")
    (claim / ".disk.img.partial").write_bytes(b"")
    with pytest.raises(ValueError, match="fewer than"):
        PvcSink.resume(written, claim, limits)
    (claim / ".disk.img.partial").unlink()
    with pytest.raises(ValueError, match="is gone"):
        PvcSink.resume(written, claim, limits)
    (claim / "moved").rename(claim / ".disk.img.partial")
    PvcSink.resume(written, claim, limits).target.close()


def _target_state(state: bytes) -> dict[str, object]:
    return state_metadata(state)["extra"]["target"]  # type: ignore[no-any-return]


def test_state_metadata(saved: tuple[bytes, Limits]) -> None:
    state, _ = saved
    meta = state_metadata(state)
    assert set(meta) == {"code", "spill_files", "extra"}
    assert set(meta["extra"]) == {"target", "offset"}
    assert meta["extra"]["target"]["kind"] == "file"
    assert json.loads(json.dumps(meta)) == meta
    assert state.startswith(snapshot_module.MAGIC)
