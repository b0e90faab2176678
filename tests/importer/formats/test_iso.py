"""ISO images: stored as they are, as a cdrom; truncation noticed."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from qcow2_helpers import MemoryTarget, MiB, decode_to_file, feed_all, make_base, qemu_compare, run

from importer.errors import ImageTooLarge, InvalidImage
from importer.formats.base import Limits
from importer.formats.decoder import ImageDecoder
from importer.formats.iso import IsoConverter


@pytest.fixture(scope="module")
def iso_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("iso")
    content = root / "content"
    (content / "boot").mkdir(parents=True)
    make_base(content / "boot" / "payload.bin", 2 * MiB, seed=3)
    (content / "README.TXT").write_text("an installer\n")
    image = root / "installer.iso"
    run(
        "xorriso",
        "-as",
        "mkisofs",
        "-quiet",
        "-J",
        "-R",
        "-V",
        "INSTALLER",
        "-o",
        str(image),
        str(content),
    )
    return image


def test_iso_is_stored_as_it_is(iso_image: Path, tmp_path: Path) -> None:
    info, out = decode_to_file(iso_image, tmp_path / "claim")
    assert (info.format, info.cdrom, info.virtual_size) == ("iso", True, iso_image.stat().st_size)
    assert out.read_bytes() == iso_image.read_bytes()
    qemu_compare(out, iso_image, "raw")


def test_gzipped_iso(iso_image: Path, tmp_path: Path) -> None:
    wrapped = tmp_path / "installer.iso.gz"
    wrapped.write_bytes(gzip.compress(iso_image.read_bytes(), compresslevel=1))
    info, out = decode_to_file(wrapped, tmp_path / "claim")
    assert (info.format, info.cdrom, info.wrappers) == ("iso", True, ("gzip",))
    assert out.read_bytes() == iso_image.read_bytes()


def test_truncated_iso(iso_image: Path) -> None:
    data = iso_image.read_bytes()
    with pytest.raises(InvalidImage, match="iso: the image is truncated"):
        feed_all(ImageDecoder(MemoryTarget(), Limits()), data[: len(data) - 4096])


def test_iso_size_limit(iso_image: Path) -> None:
    with pytest.raises(ImageTooLarge, match="iso"):
        feed_all(
            IsoConverter(MemoryTarget(), Limits(max_virtual_size=1 * MiB)), iso_image.read_bytes()
        )


def test_udf_without_iso9660_descriptor() -> None:
    """A UDF medium: recognised by its volume recognition sequence, no size check."""
    data = bytearray(200 * 1024)
    for k, ident in enumerate([b"BEA01", b"NSR02", b"TEA01"]):
        start = 32768 + 2048 * k
        data[start : start + 7] = b"\x00" + ident + b"\x01"
    target = MemoryTarget()
    info = feed_all(ImageDecoder(target, Limits()), data)
    assert (info.format, info.cdrom, info.virtual_size) == ("iso", True, len(data))
    assert target.image(len(data)) == bytes(data)
