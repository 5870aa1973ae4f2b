"""export: individuals, detections and sightings as CSV tables or a Camtrap DP package (through the API);
export-labels: decided detections as a folder `train` accepts (from the database)."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from deer_reid.cli.context import api, database_url_for, settings_for
from deer_reid.cli.output import reported
from deer_reid.cli.parsing import add_command


def register(commands) -> None:
    ex = add_command(commands, "export-labels", cmd_export_labels,
                     help="decided detections as a folder `train` accepts")
    ex.add_argument("out")
    ex.add_argument("--property", help="only this property")
    ex.add_argument("--human-only", action="store_true", help="only what a person decided")
    ex.add_argument("--source-labels", action="store_true",
                    help="the labels the photos came with (Camtrap DP individualID) as the identities")

    xp = add_command(commands, "export", cmd_export,
                     help="individuals, detections and sightings as CSV tables or a Camtrap DP package")
    xp.add_argument("out", help="folder to write into")
    xp.add_argument("--format", choices=["csv", "camtrap-dp"], default="csv")
    xp.add_argument("--property", help="only this property")
    xp.add_argument("--scientific-name", default="Cervidae", help="Camtrap DP: the taxon of the animals")
    xp.add_argument("--with-media", action="store_true",
                    help="Camtrap DP: write the images too, at each media row's filePath (a package another "
                    "stack can ingest with `deer-reid ingest OUT --camtrap-dp`)")
    xp.add_argument("--api-url")


def cmd_export_labels(args) -> int:
    from deer_reid.training.labels import ExportError, export_labels

    settings = settings_for(args)
    return reported("export-labels", lambda: asyncio.run(export_labels(
        database_url_for(settings), Path(args.out), prop=args.property, human_only=args.human_only,
        source_labels=args.source_labels)), (ExportError,))


def cmd_export(args) -> int:
    import io
    import zipfile

    params = {"format": args.format, "scientific_name": args.scientific_name}
    if args.property:
        params["property"] = args.property
    data = api(args, "GET", "/v1/export", params=params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        z.extractall(out)
        names = z.namelist()
    print(f"wrote {', '.join(names)} to {out}")
    if args.with_media:
        if args.format != "camtrap-dp":
            print("deer-reid export: --with-media goes with --format camtrap-dp", file=sys.stderr)
            return 2
        import csv

        with open(out / "media.csv", newline="") as f:
            media = list(csv.DictReader(f))
        for row in media:  # one image at a time: a season's photos never sit in memory together
            target = out / row["filePath"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(api(args, "GET", f"/v1/images/{row['mediaID']}"))
        print(f"wrote {len(media)} images under {out / 'media'}")
    return 0
