"""Archives of camera images read entry by entry: good entries come out, hostile ones are refused with the
reason, and what would cost unbounded work ends the archive."""
from __future__ import annotations

import io
import tarfile

import pytest

from shared.archives import ArchiveRejected, Limits, is_archive, read_entries, unsafe_path
from tests.conftest import make_jpeg, tar_of, zip_of

LIMITS = Limits(max_entry_bytes=1024 * 1024)
JPEG = make_jpeg(64, 48)


def entries(data: bytes, limits: Limits = LIMITS) -> list:
    return list(read_entries(io.BytesIO(data), limits))


def outcome(data: bytes, limits: Limits = LIMITS) -> dict[str, str]:
    return {e.name: ("ok" if e.data is not None else e.error) for e in entries(data, limits)}


HOSTILE_NAMES = {"../escape.jpg": "climbs", "a/../../b.jpg": "climbs", "/etc/abs.jpg": "absolute",
                 "C:/win.jpg": "absolute", "tab\there.jpg": "control"}


@pytest.mark.parametrize("build", [zip_of, tar_of, lambda e: tar_of(e, "w"), lambda e: tar_of(e, "w:bz2"),
                                   lambda e: tar_of(e, "w:xz")], ids=["zip", "tgz", "tar", "tbz2", "txz"])
def test_images_come_out_and_tricks_are_refused_per_entry(build):
    data = build({"cam1/ridge_20251101_060000.jpg": JPEG, "cam2/b.JPEG": JPEG, "notes.txt": b"hello",
                  "nested.zip": zip_of({"x.jpg": JPEG}), "__MACOSX/cam1/._a.jpg": b"\0\5",
                  ".DS_Store": b"\0", **{name: JPEG for name in HOSTILE_NAMES}})
    assert is_archive(data[:512])
    got = outcome(data)
    assert got.pop("cam1/ridge_20251101_060000.jpg") == "ok" and got.pop("cam2/b.JPEG") == "ok"
    assert "not an image" in got.pop("notes.txt") and "not opened" in got.pop("nested.zip")
    for name, why in HOSTILE_NAMES.items():
        # tar keeps a leading '/' out of its names only when told; the reader sees what the archive holds
        assert why in got.pop(name), name
    assert got == {}  # metadata files and folders are skipped silently
    [first] = [e for e in entries(data) if e.data is not None][:1]
    assert first.file_name == "ridge_20251101_060000.jpg" and first.data == JPEG


def test_links_and_devices_are_refused():
    assert "symbolic link" in outcome(zip_of({"l.jpg": b"/etc/passwd"}, links=("l.jpg",)))["l.jpg"]
    assert "link" in outcome(tar_of({"a.jpg": JPEG}, links={"l.jpg": "/etc/passwd"}))["l.jpg"]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as t:
        info = tarfile.TarInfo("dev.jpg")
        info.type = tarfile.CHRTYPE
        t.addfile(info)
    assert "not a regular file" in outcome(out.getvalue())["dev.jpg"]


def test_a_zip_bomb_entry_is_refused_unread_and_the_rest_go_on():
    bomb = b"\0" * (4 * 1024 * 1024)  # deflates about 1000-fold
    got = outcome(zip_of({"bomb.jpg": bomb, "ok.jpg": JPEG}), Limits(max_entry_bytes=8 * 1024 * 1024))
    assert "zip bomb" in got["bomb.jpg"] and got["ok.jpg"] == "ok"
    got = outcome(zip_of({"big.jpg": bomb, "ok.jpg": JPEG}))  # and over the per-entry limit first
    assert "over the limit" in got["big.jpg"] and got["ok.jpg"] == "ok"


def test_a_zip_whose_declared_size_lies_is_read_no_further_than_the_limit():
    big = make_jpeg(64, 48) + bytes(range(256)) * 8192  # 2 MB, barely compressible
    data = bytearray(zip_of({"liar.jpg": big}))
    # rewrite the declared size in the central directory (and local header) to 1 KB
    for sig, offset in ((b"PK\x01\x02", 24), (b"PK\x03\x04", 22)):
        at = data.find(sig)
        data[at + offset:at + offset + 4] = (1024).to_bytes(4, "little")
    got = outcome(bytes(data))
    assert got["liar.jpg"] != "ok"  # a bad CRC or a cut entry, never 2 MB read under a 1 KB claim


def test_a_tar_bomb_ends_the_archive_at_the_total_limit():
    huge = tar_of({f"{n}.jpg": b"\0" * (2 * 1024 * 1024) for n in range(8)})  # 16 MB inflated, ~16 KB gzipped
    limits = Limits(max_entry_bytes=1024 * 1024, max_total_bytes=8 * 1024 * 1024)
    refused = []
    with pytest.raises(ArchiveRejected, match="inflates past") as exc:
        for e in read_entries(io.BytesIO(huge), limits):
            refused.append(e.error)
    assert exc.value.status == 413 and refused and all("over the limit" in r for r in refused)


def test_too_many_entries_end_the_archive():
    many = zip_of({f"{n}.jpg": JPEG for n in range(30)})
    with pytest.raises(ArchiveRejected, match="more than 10 entries"):
        entries(many, Limits(max_entry_bytes=1024 * 1024, max_entries=10))


def test_truncated_and_garbage_archives_say_so():
    data = tar_of({"a.jpg": JPEG, "b.jpg": JPEG * 40}, "w")
    got = []
    with pytest.raises(ArchiveRejected):
        for e in read_entries(io.BytesIO(data[: len(data) // 2]), LIMITS):
            got.append(e)
    assert [e.name for e in got if e.data is not None] == ["a.jpg"]
    with pytest.raises(ArchiveRejected, match="not a readable"):
        entries(b"PK\x03\x04 this is not a zip at all")
    with pytest.raises(ArchiveRejected, match="not a readable"):
        entries(b"just text, no archive")


def test_an_encrypted_zip_entry_is_refused():
    data = bytearray(zip_of({"secret.jpg": JPEG}))
    for sig, offset in ((b"PK\x01\x02", 8), (b"PK\x03\x04", 6)):
        at = data.find(sig)
        data[at + offset] |= 0x1
    assert "encrypted" in outcome(bytes(data))["secret.jpg"]


@pytest.mark.parametrize("name,why", [("a/b/c.jpg", None), ("../a.jpg", "climbs"), ("a\\..\\b.jpg", "climbs"),
                                      ("\\\\server\\x.jpg", "absolute"), ("x" * 300 + ".jpg", "too long")])
def test_unsafe_path(name, why):
    got = unsafe_path(name)
    assert (got is None) if why is None else (why in got)


def test_is_archive_by_magic_or_suffix():
    assert is_archive(zip_of({})[:512]) and is_archive(zip_of({"a.jpg": JPEG})[:512])
    assert is_archive(tar_of({"a.jpg": JPEG}, "w")[:512]) and is_archive(b"", "card.tar.gz")
    assert not is_archive(JPEG[:512], "a.jpg")
