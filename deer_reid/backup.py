"""`deer-reid backup OUT` and `deer-reid restore IN`: a season's census saved and brought back whole.

A backup is a folder: `database.dump` (pg_dump's custom format: one consistent snapshot of every table,
people's decisions, names, the audit log, the identity graph, calibrations and keys among them), `blobs/`
(the original images, content-addressed and never changed once written), `models/` (the cards and
weights of models `deer-reid train` wrote, which embeddings name by version), and `manifest.json` (what
is in it, each file's SHA-256 and size, deer-reid's version, the migrations applied, pg_dump's version).

Consistency while the stack runs: the dump is taken first, in one snapshot; an image's blob is written
before the upload's transaction commits, so every image row in the snapshot has its blob on disk when
the blobs are copied after it (blobs of later uploads come along too, and are harmless).

A property's backup (`--property P`) holds the same kinds of things for one property only: `schema.dump`
(pg_dump's schema, no rows) and `tables/*.copy` (each table's rows of that property, COPY'd in the same
snapshot, in PostgreSQL's binary format), the blobs of the property's images, and the trained models.
`PROPERTY_ROWS` says which rows of each table belong to a property; a table it does not name refuses the
backup, so a migration that adds one cannot be left out unseen. API keys are never in a property's backup
(they open the whole stack); the stack-wide settings and the calibrations fitted for every property are.

Restore goes into an empty home only (or `--force`), checks every checksum before touching anything,
restores the dump into a fresh embedded PostgreSQL there, copies the blobs and models, and applies the
migrations newer than the backup's. A property's backup restores the same way: schema, then its rows, then
the indexes and keys (which check that the rows hold together), then the id counters past the restored ids.
It goes into an empty home only: ids are kept as they were, and another stack's ids would collide.
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
FORMAT_VERSION = 1  # a whole state's backup
PROPERTY_FORMAT_VERSION = 2  # one property's (no database.dump: a deer-reid that knows only 1 refuses it)
DUMP = "database.dump"
SCHEMA = "schema.dump"
MANIFEST = "manifest.json"

_OF_DETECTIONS = "detection_id IN (SELECT id FROM detections WHERE property = $1)"
# Which rows of each table a property's backup holds ($1: the property); None: not in it.
PROPERTY_ROWS: dict[str, str | None] = {
    "schema_migrations": "true",
    "runtime_config": "true",  # the stack-wide switches the property's decisions ran under
    "runtime_config_history": "true",
    "properties": "name = $1",
    "sites": "property = $1",
    # its detections' images, and those of its sites with no detection (a site without detections may
    # move between properties; its images with detections never do)
    "images": "sha256 IN (SELECT image_sha256 FROM detections WHERE property = $1) "
              "OR site IN (SELECT name FROM sites WHERE property = $1) "
              "AND NOT EXISTS (SELECT 1 FROM detections d WHERE d.image_sha256 = images.sha256)",
    "individuals": "property = $1",
    "detections": "property = $1",
    "outbox": _OF_DETECTIONS,
    "embeddings": _OF_DETECTIONS,
    "detection_features": _OF_DETECTIONS,
    "coat_patterns": _OF_DETECTIONS,
    "antler_fingerprints": _OF_DETECTIONS,
    "decisions": _OF_DETECTIONS,
    "calibrations": "property IS NULL OR property = $1",  # the stack-wide ones are in force for it too
    "api_keys": None,
    "audit_log": "property = $1",
    "identity_edges": "property = $1",
    "census_runs": "property = $1",
    "census_questions": "property = $1",
    "identity_answers": "property = $1",
}


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


def _rows_of(table: str, prop: str) -> tuple[str, list]:
    """The query (and its arguments) of a table's rows that belong to `prop` (PROPERTY_ROWS)."""
    rule = PROPERTY_ROWS[table]
    return f"SELECT * FROM {table} WHERE {rule}", [prop] if "$1" in rule else []


async def _connected(dsn: str, work):
    """`await work(conn)` on a connection of its own, closed afterwards."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _copy_tree(source: Path, target: Path, files: dict, prefix: str, only: set[str] | None = None) -> None:
    """Copy every file under `source` (or only those named in `only`: blobs are named by their sha256)."""
    if not source.exists():
        return
    for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.name.endswith(".partial")):
        if only is not None and path.name not in only:
            continue
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


def backup(dsn: str, out: Path, *, blobs: Path, model_cache: Path, prop: str | None = None) -> dict:
    """Write a backup of everything the stack at `dsn` holds, or of one property, into the new folder `out`."""
    import asyncio

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise BackupError(f"{out} is not empty: back up into a new folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    migrations, counts, images = asyncio.run(_dump(dsn, out, prop))
    dump_s = time.monotonic() - started
    files = {rel.relative_to(out).as_posix(): {"sha256": sha256_of(rel), "bytes": rel.stat().st_size}
             for rel in sorted([out / DUMP] if prop is None else [out / SCHEMA, *(out / "tables").glob("*.copy")])}
    database_bytes = sum(f["bytes"] for f in files.values())
    _copy_tree(Path(blobs), out / "blobs", files, "blobs", only=images)
    for folder in trained_models(model_cache):
        _copy_tree(folder, out / "models" / folder.name, files, f"models/{folder.name}")
    version = subprocess.run([_tool("pg_dump"), "--version"], capture_output=True, text=True).stdout.strip()
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION if prop is None else PROPERTY_FORMAT_VERSION,
                "deer_reid": _version(),
                "created": datetime.now(timezone.utc).isoformat(), "pg_dump": version, "migrations": migrations,
                "property": prop, "rows": counts, "files": files}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return {"folder": str(out), "property": prop, "files": len(files),
            "bytes": sum(f["bytes"] for f in files.values()), "database_bytes": database_bytes,
            "dump_s": round(dump_s, 2), "total_s": round(time.monotonic() - started, 2), "rows": counts}


async def _pg_dump(dsn: str, snapshot: str, target: Path, *options: str) -> None:
    import asyncio

    proc = await asyncio.create_subprocess_exec(
        _tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges", f"--snapshot={snapshot}", *options,
        f"--file={target}", "--dbname", dsn, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise BackupError(f"pg_dump failed: {err.decode(errors='replace').strip()[-2000:]}")


async def _dump(dsn: str, out: Path, prop: str | None) -> tuple[list[str], dict[str, int], set[str] | None]:
    """pg_dump inside a snapshot this connection exports and holds: the rows counted for the manifest are
    exactly the rows in the dump, whatever the running stack writes meanwhile. For a property, its rows are
    copied out in the same snapshot; returns the sha256 of its images then (None: every image)."""
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_export_snapshot()")
            if prop is None:
                migrations, counts = await _describe(conn)
                await _pg_dump(dsn, snapshot, out / DUMP)
                return migrations, counts, None
            if not await conn.fetchval("SELECT count(*) FROM properties WHERE name = $1", prop):
                raise BackupError(f"no property {prop!r}")
            migrations, counts = await _describe(conn, prop)
            tables = {r["tablename"] for r in await conn.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            unknown = sorted(tables - set(PROPERTY_ROWS))
            if unknown:
                raise BackupError(f"table(s) {', '.join(unknown)} have no rule for a property's backup "
                                  "(deer_reid/backup.py PROPERTY_ROWS): nothing written")
            await _pg_dump(dsn, snapshot, out / SCHEMA, "--schema-only")
            (out / "tables").mkdir()
            for table in sorted(t for t in tables if PROPERTY_ROWS[t] is not None):
                query, args = _rows_of(table, prop)
                await conn.copy_from_query(query, *args, output=str(out / "tables" / f"{table}.copy"),
                                           format="binary")
            images = {r["sha256"] for r in await conn.fetch(
                f"SELECT sha256 FROM images WHERE {PROPERTY_ROWS['images']}", prop)}
            return migrations, counts, images
    finally:
        await conn.close()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("deer-reid")
    except PackageNotFoundError:
        return "unknown"


COUNTED = ("images", "detections", "individuals", "audit_log", "identity_answers", "calibrations", "api_keys")


async def _describe(conn, prop: str | None = None) -> tuple[list[str], dict[str, int]]:
    """The migrations applied and the rows of the counted tables (of one property's backup, or all)."""
    migrations = [r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations ORDER BY version")]
    tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
    counted = [t for t in COUNTED if t in tables and (prop is None or PROPERTY_ROWS.get(t) is not None)]
    if prop is None:
        counts = {t: await conn.fetchval(f"SELECT count(*) FROM {t}") for t in counted}
    else:
        counts = {}
        for t in counted:
            query, args = _rows_of(t, prop)
            counts[t] = await conn.fetchval(f"SELECT count(*) FROM ({query}) rows", *args)
    return migrations, counts


def verify(folder: Path) -> dict:
    """The manifest of a backup whose every file is there with its checksum; raises BackupError."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{folder} holds no readable {MANIFEST}: {exc}") from None
    if manifest.get("format") != FORMAT or manifest.get("format_version") not in (FORMAT_VERSION,
                                                                                   PROPERTY_FORMAT_VERSION):
        raise BackupError(f"{folder} is not a {FORMAT} version {FORMAT_VERSION} or {PROPERTY_FORMAT_VERSION} backup")
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


def _pg_restore(dsn: str, dump: Path, *options: str) -> None:
    done = subprocess.run([_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", *options,
                           "--dbname", dsn, str(dump)], capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"pg_restore failed: {done.stderr.strip()[-2000:]}")


async def _load_tables(conn, folder: Path, files: list[str]) -> None:
    """A property's rows into the tables the schema made (before their keys exist: any order), in one
    transaction."""
    async with conn.transaction():
        for rel in sorted(files):
            await conn.copy_to_table(Path(rel).stem, source=str(folder / rel), format="binary")


async def _after_rows(conn) -> None:
    """What a schema-only dump leaves out and a stack needs: each id counter past the largest restored id,
    and the `default` property that sites nobody registered join (made by a migration's rows)."""
    await conn.execute("INSERT INTO properties (name) VALUES ('default') ON CONFLICT DO NOTHING")
    owned = await conn.fetch(
        """SELECT c.table_name, c.column_name, pg_get_serial_sequence(c.table_name, c.column_name) AS seq
           FROM information_schema.columns c WHERE c.table_schema = 'public'
           AND pg_get_serial_sequence(c.table_name, c.column_name) IS NOT NULL""")
    for r in owned:
        await conn.execute(f"SELECT setval($1, coalesce((SELECT max({r['column_name']}) FROM {r['table_name']}), "
                           "0) + 1, false)", r["seq"])


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
        if manifest.get("property") is None:
            _pg_restore(dsn, folder / DUMP)
        else:
            _pg_restore(dsn, folder / SCHEMA, "--section=pre-data")
            tables = [rel for rel in manifest["files"] if rel.startswith("tables/")]
            asyncio.run(_connected(dsn, lambda conn: _load_tables(conn, folder, tables)))
            _pg_restore(dsn, folder / SCHEMA, "--section=post-data")
            asyncio.run(_connected(dsn, _after_rows))
        applied = asyncio.run(migrate(dsn))
        _, counts = asyncio.run(_connected(dsn, lambda conn: _describe(conn, manifest.get("property"))))
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
