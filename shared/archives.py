"""Zip and tar archives of camera images, read entry by entry within limits (no I/O beyond the file object).

A season's card dump arrives as one archive. Entries are read one at a time, so memory holds one image,
never the archive. What an archive may not do is refused per entry, with the reason, and the rest go on:
a path that climbs out ('../', absolute, a drive letter), a link or a device, an entry over the size limit,
an entry that inflates suspiciously (a zip bomb: declared size over `max_ratio` times its compressed
size). What would cost unbounded work ends the whole archive: more entries than `max_entries`, or more
bytes inflated or skipped than `max_total_bytes` (the limit counts the bytes a tar stream must inflate to
skip an entry, too). Directories and the metadata files archivers add (`__MACOSX/`, `.DS_Store`, dot files)
are skipped silently; any other non-image entry is skipped with its reason.
"""
from __future__ import annotations

import posixpath
import tarfile
import zipfile
from dataclasses import dataclass
from typing import BinaryIO, Iterator

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# how an archive's first bytes look: zip's local header (or the end record of an empty zip), gzip, bzip2, xz
_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class ArchiveRejected(ValueError):
    """The archive as a whole cannot be read, or would cost more than its limits allow."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_entry_bytes: int  # one image (the upload limit)
    max_entries: int = 100_000  # entries of any kind, directories included
    max_total_bytes: int = 64 * 1024 ** 3  # inflated or skipped, all entries together
    max_ratio: float = 100.0  # declared over compressed size of one zip entry (JPEGs barely compress)


@dataclass(frozen=True)
class Entry:
    """One image entry (`data`), or one refused (`error`); `name` is its path inside the archive."""

    name: str
    data: bytes | None = None
    error: str | None = None
    status: int = 422

    @property
    def file_name(self) -> str:
        """The entry's last path part: what the upload names the image (SITE_YYYYMMDD_HHMMSS still works)."""
        return posixpath.basename(self.name)


def is_archive(head: bytes, name: str = "") -> bool:
    """Whether a file that starts with `head` (at least 512 bytes where available) is an archive."""
    if head.startswith(_MAGIC) or name.lower().endswith(ARCHIVE_SUFFIXES):
        return True
    return len(head) >= 262 and head[257:262] == b"ustar"  # an uncompressed POSIX tar


def unsafe_path(name: str) -> str | None:
    """Why an entry's path must not be used, or None. Only the last part is used, but an archive that
    carries a climbing or absolute path was made to attack extractors: its entry is refused, not cleaned."""
    if not name or "\x00" in name or any(ord(c) < 32 for c in name):
        return "the entry's name has control characters"
    path = name.replace("\\", "/")
    if path.startswith("/") or (len(path) > 1 and path[1] == ":"):
        return "the entry's path is absolute"
    if ".." in path.split("/"):
        return "the entry's path climbs out of the archive ('..')"
    if len(path) > 1024 or len(posixpath.basename(path)) > 255:
        return "the entry's name is too long"
    return None


def _metadata(name: str) -> bool:
    parts = name.replace("\\", "/").split("/")
    return "__MACOSX" in parts or posixpath.basename(name).startswith(".")


def _kind(name: str) -> str | None:
    """Why a regular entry is not read as an image, or None when it is one."""
    suffix = posixpath.splitext(name)[1].lower()
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        return "an archive inside the archive is not opened"
    if suffix not in IMAGE_SUFFIXES:
        return f"not an image file ({suffix or 'no suffix'})"
    return None


class _Budget:
    def __init__(self, limits: Limits):
        self.limits = limits
        self.entries = 0
        self.bytes = 0

    def entry(self) -> None:
        self.entries += 1
        if self.entries > self.limits.max_entries:
            raise ArchiveRejected(f"the archive has more than {self.limits.max_entries} entries", status=413)

    def spend(self, n: int) -> None:
        self.bytes += n
        if self.bytes > self.limits.max_total_bytes:
            raise ArchiveRejected(f"the archive inflates past {self.limits.max_total_bytes} bytes", status=413)


def read_entries(file: BinaryIO, limits: Limits) -> Iterator[Entry]:
    """The archive's image entries in order, each read or refused; raises ArchiveRejected (possibly after
    some entries) when the archive cannot be read on or breaks a whole-archive limit."""
    head = file.read(4)
    file.seek(0)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        yield from _zip_entries(file, limits)
    else:
        yield from _tar_entries(file, limits)


def _zip_entries(file: BinaryIO, limits: Limits) -> Iterator[Entry]:
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ArchiveRejected(f"not a readable zip archive: {exc}") from None
    budget = _Budget(limits)
    with archive:
        for info in archive.infolist():
            budget.entry()
            name = info.filename
            if info.is_dir() or _metadata(name):
                continue
            why = unsafe_path(name)
            if why is None and (info.external_attr >> 16) & 0o170000 == 0o120000:
                why = "the entry is a symbolic link"
            why = why or _kind(name)
            if why is not None:
                yield Entry(name, error=why)
                continue
            if info.flag_bits & 0x1:
                yield Entry(name, error="the entry is encrypted")
                continue
            if info.file_size > limits.max_entry_bytes:
                yield Entry(name, error=f"the entry is over the limit of {limits.max_entry_bytes} bytes", status=413)
                continue
            if info.compress_size and info.file_size / info.compress_size > limits.max_ratio:
                yield Entry(name, error=f"the entry inflates {info.file_size / info.compress_size:.0f}-fold "
                                        f"(over {limits.max_ratio:.0f}): refused as a possible zip bomb", status=413)
                continue
            try:
                with archive.open(info) as member:
                    # the declared size may lie: read one byte past the limit, never more
                    data = member.read(limits.max_entry_bytes + 1)
            except (zipfile.BadZipFile, OSError, ValueError, NotImplementedError, EOFError) as exc:
                yield Entry(name, error=f"the entry cannot be read: {exc}")
                continue
            budget.spend(len(data))
            if len(data) > limits.max_entry_bytes:
                yield Entry(name, error=f"the entry is over the limit of {limits.max_entry_bytes} bytes", status=413)
                continue
            yield Entry(name, data=data)


def _tar_entries(file: BinaryIO, limits: Limits) -> Iterator[Entry]:
    try:
        # a stream ("r|*"): members are read in order and never seeked back to, whatever the compression
        archive = tarfile.open(fileobj=file, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ArchiveRejected(f"not a readable zip or tar archive: {exc}") from None
    budget = _Budget(limits)
    try:
        with archive:
            for info in archive:
                budget.entry()
                name = info.name
                if info.isdir() or _metadata(name):
                    budget.spend(info.size)
                    continue
                why = unsafe_path(name)
                if why is None and not info.isreg():
                    why = "the entry is a link" if info.issym() or info.islnk() else "the entry is not a regular file"
                why = why or _kind(name)
                if why is None and info.size > limits.max_entry_bytes:
                    why = f"the entry is over the limit of {limits.max_entry_bytes} bytes"
                # skipping an entry of a compressed stream inflates it all the same: it counts
                budget.spend(info.size)
                if why is not None:
                    yield Entry(name, error=why, status=413 if "over the limit" in why else 422)
                    continue
                member = archive.extractfile(info)
                data = member.read() if member is not None else b""
                if len(data) != info.size:
                    yield Entry(name, error="the entry is cut short (a truncated archive)")
                    continue
                yield Entry(name, data=data)
    except (tarfile.TarError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ArchiveRejected(f"the archive cannot be read on: {exc}") from None
