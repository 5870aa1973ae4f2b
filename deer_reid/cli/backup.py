"""backup and restore: the whole state (database, images, trained models), or one property's."""
from __future__ import annotations

import sys
from pathlib import Path

from deer_reid.cli.context import database_url_for, settings_for
from deer_reid.cli.output import reported
from deer_reid.cli.parsing import add_command


def register(commands) -> None:
    bk = add_command(commands, "backup", cmd_backup, help="save the whole state (database, images, trained models) "
                     "into a new folder, consistently, while the stack runs")
    bk.add_argument("out")
    bk.add_argument("--property", help="only this property: its sites, images, detections, individuals, people's "
                    "decisions, audit log and identity graph (restores into an empty home)")
    rs = add_command(commands, "restore", cmd_restore, help="bring a backup back into an empty DEER_HOME "
                     "(checksums first; newer migrations applied after)")
    rs.add_argument("backup")
    rs.add_argument("--force", action="store_true", help="replace a home that is not empty")


def cmd_backup(args) -> int:
    from deer_reid.backup import BackupError, backup

    settings = settings_for(args)
    return reported("backup", lambda: backup(database_url_for(settings), Path(args.out), blobs=settings.blobs,
                                             model_cache=settings.model_cache, prop=args.property),
                    (BackupError,))


def cmd_restore(args) -> int:
    from deer_reid.backup import BackupError, restore

    settings = settings_for(args)
    if settings.database_url:
        print("deer-reid restore: DEER_DATABASE_URL is set: restore brings a backup into the embedded default's "
              "home; for a managed PostgreSQL use pg_restore (see the README)", file=sys.stderr)
        return 2
    return reported("restore", lambda: restore(Path(args.backup), settings.home, blobs=settings.blobs,
                                               model_cache=settings.model_cache, force=args.force), (BackupError,))
