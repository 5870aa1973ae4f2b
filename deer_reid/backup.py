"""`deer-reid backup OUT` and `deer-reid restore IN`: a season's census saved and brought back whole.

A backup is a folder: `database.dump` (pg_dump's custom format: one consistent snapshot of every table,
people's decisions, names, the audit log, the identity graph, calibrations and keys among them), `blobs/`
(the original images, content-addressed and never changed once written), `models/` (the cards and
weights of models `deer-reid train` wrote, which embeddings name by version), and `manifest.json` (what
is in it, each file's SHA-256 and size, deer-reid's version, the migrations applied, pg_dump's version).

Consistency while the stack runs: the dump is taken first, in one snapshot; an image's blob is written
before the upload's transaction commits, so every image row in the snapshot has its blob on disk when
the blobs are copied after it (blobs of later uploads come along too, and are harmless).

Restore goes into an empty home only (or `--force`), checks every checksum before touching anything,
restores the dump into a fresh embedded PostgreSQL there, copies the blobs and models, and applies the
migrations newer than the backup's.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

from shared.models import sha256_of

FORMAT = "deer-reid-backup"
FORMAT_VERSION = 1
DUMP = "database.dump"
MANIFEST = "manifest.json"


class BackupError(RuntimeError):
    pass


def _tool(name: str) -> str:
    """pg_dump / pg_restore of the embedded PostgreSQL (the server's own major version), else PATH's."""
    from shared.embedded import postgres_bin

    try:
        found = postgres_bin() / name
    except ImportError:
        found = None
    if found is not None and found.exists():
        return str(found)
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"{name} not found: install PostgreSQL's client tools")
    return path


def _copy_tree(source: Path, target: Path, files: dict, prefix: str) -> None:
    if not source.exists():
        return
    for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.endswith(".partial")):
        rel = path.relative_to(source)
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest)
        files[f"{prefix}/{rel.as_posix()}"] = {"sha256": sha256_of(dest), "bytes": dest.stat().st_size}


def trained_models(model_cache: Path) -> list[Path]:
    """Folders of the models `deer-reid train` wrote (a card beside the weights); built-in weights are
    restored from their packages or the hub, and are not part of a census."""
    from shared.models import CARD_FILE

    return sorted(p.parent for p in Path(model_cache).glob(f"*/{CARD_FILE}"))


def backup(dsn: str, out: Path, *, blobs: Path, model_cache: Path) -> dict:
    """Write a backup of everything the stack at `dsn` holds into the new folder `out`."""
    import asyncio

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: back up into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    migrations, counts = asyncio.run(_dump(dsn, out / DUMP))
    dump_s = time.monotonic() - started
    files = {DUMP: {"sha256": sha256_of(out / DUMP), "bytes": (out / DUMP).stat().st_size}}
    _copy_tree(Path(blobs), out / "blobs", files, "blobs")
    for folder in trained_models(model_cache):
        _copy_tree(folder, out / "models" / folder.name, files, f"models/{folder.name}")
    version = subprocess.run([_tool("pg_dump"), "--version"], capture_output=True, text=True).stdout.strip()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "deer_reid": _version(),
                "created": datetime.now(timezone.utc).isoformat(), "pg_dump": version, "migrations": migrations,
                "rows": counts, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"folder": str(out), "files": len(files), "bytes": sum(f["bytes"] for f in files.values()),
            "database_bytes": files[DUMP]["bytes"], "dump_s": round(dump_s, 2),
            "total_s": round(time.monotonic() - started, 2), "rows": counts}


async def _dump(dsn: str, target: Path) -> tuple[list[str], dict[str, int]]:
    """pg_dump inside a snapshot this connection exports and holds: the rows counted for the manifest are
    exactly the rows in the dump, whatever the running stack writes meanwhile."""
    import asyncio

    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            migrations, counts = await _describe(conn)
            proc = await asyncio.create_subprocess_exec(
                _tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", f"--snapshot={snapshot}",
                f"--file={target}", "--dbname", dsn, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            _, err = await proc.communicate()
            if proc.returncode != 0:
                raise BackupError(f"pg_dump failed: {err.decode(errors='replace').strip()[-2000:]}")
    finally:
        await conn.close()
    return migrations, counts


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deer-reid")
    except PackageNotFoundError:
        return "unknown"


COUNTED = ("images", "detections", "individuals", "audit_log", "identity_answers", "calibrations", "api_keys")


async def _describe(conn) -> tuple[list[str], dict[str, int]]:
    migrations = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")]
    tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    counts = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in COUNTED if t in tables}
    return migrations, counts


async def _describe_dsn(dsn: str) -> tuple[list[str], dict[str, int]]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await _describe(conn)
    finally:
        await conn.close()


def verify(folder: Path) -> dict:
    """The manifest of a backup whose every file is there with its checksum; raises BackupError."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder} holds no readable {MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise BackupError(f"{folder} is not a {FORMAT} version {FORMAT_VERSION} backup")
    bad = []
    for rel, want in manifest["files"].items():
        path = folder / rel
        if not path.resolve().is_relative_to(folder.resolve()):
            bad.append(f"{rel}: outside the backup")
        elif not path.is_file():
            bad.append(f"{rel}: missing")
        elif path.stat().st_size != want["bytes"] or sha256_of(path) != want["sha256"]:
            bad.append(f"{rel}: checksum does not match")
    if bad:
        raise BackupError(f"{len(bad)} file(s) of the backup are damaged, nothing restored: " + "; ".join(bad[:10]))
    return manifest


def home_is_empty(home: Path) -> bool:
    return not Path(home).exists() or not any(Path(home).iterdir())


def restore(folder: Path, home: Path, *, blobs: Path, model_cache: Path, force: bool = False) -> dict:
    """Bring a backup back into `home` (its embedded PostgreSQL, blobs and trained models)."""
    import asyncio

    from deer_reid.stack import pid_alive, read_state
    from shared.db import migrate
    from shared.embedded import EmbeddedPostgres

    folder, home = Path(folder), Path(home)
    state = read_state(home)
    if state and pid_alive(state["supervisor_pid"]):
        raise BackupError(f"a stack is running on {home}: `deer-reid down` first")
    if not home_is_empty(home) and not force:
        raise BackupError(f"{home} is not empty: restore into an empty home, or give --force to replace what "
                          "is there")
    manifest = verify(folder)  # every checksum before anything is touched
    started = time.monotonic()
    if force:
        shutil.rmtree(home / "pg", ignore_errors=True)
        shutil.rmtree(blobs, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    pg = EmbeddedPostgres(home / "pg")
    dsn = pg.start()
    try:
        done = subprocess.run([_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error",
                               "--dbname", dsn, str(folder / DUMP)], capture_output=True, text=True)
        if done.returncode != 0:
            raise BackupError(f"pg_restore failed: {done.stderr.strip()[-2000:]}")
        applied = asyncio.run(migrate(dsn))
        _, counts = asyncio.run(_describe_dsn(dsn))
    finally:
        pg.stop()
    copied = 0
    for rel in manifest["files"]:
        if rel.startswith("blobs/"):
            target = Path(blobs) / rel[len("blobs/"):]
        elif rel.startswith("models/"):
            target = Path(model_cache) / rel[len("models/"):]
        else:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / rel, target)
        copied += 1
    return {"home": str(home), "files": copied, "migrations_applied": applied, "rows": counts,
            "rows_match_backup": counts == manifest["rows"], "total_s": round(time.monotonic() - started, 2)}
