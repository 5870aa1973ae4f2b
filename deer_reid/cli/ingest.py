"""ingest: upload a folder, an image, an archive, MegaDetector output or a Camtrap DP package."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from deer_reid.cli.context import settings_for
from deer_reid.cli.output import keep_json, print_json
from deer_reid.cli.parsing import add_command
from deer_reid.client import api_url, auth_headers
from shared.schemas import DetectionClass


def register(commands) -> None:
    ing = add_command(commands, "ingest", cmd_ingest, help="upload a folder (recursively), one image, or a zip or "
                      "tar archive (entries read one at a time; refused entries are reported, the rest go on)")
    ing.add_argument("path")
    ing.add_argument("--site", help="camera site of the images (its property is looked up: `deer-reid sites`); "
                     "default: from SITE_YYYYMMDD_HHMMSS file names, else 'default'")
    ing.add_argument("--camera")
    ing.add_argument("--captured-at", help="ISO-8601 time for images whose own time cannot be read")
    ing.add_argument("--detections", type=Path, metavar="MD_JSON",
                     help="MegaDetector batch output for the folder: animal boxes become detections, people and "
                     "vehicles are never uploaded, images without an animal box are skipped")
    ing.add_argument("--min-conf", type=float, default=0.2, help="with --detections: the least confidence of an "
                     "animal box (MegaDetector's typical threshold; default 0.2)")
    ing.add_argument("--cls", default="unknown", choices=[c.value for c in DetectionClass],
                     help="class of every detection (antlered or not, as far as it is known)")
    ing.add_argument("--cls-map", type=Path, metavar="CSV",
                     help="with --detections: a CSV of file,cls giving each image's class (beats --cls)")
    ing.add_argument("--camtrap-dp", action="store_true",
                     help="PATH is a Camtrap DP 1.0.2 data package: deployments become sites and cameras, media "
                     "with boxed observations become uploads, eventID the sighting, individualID a label")
    ing.add_argument("--taxon", help="with --camtrap-dp: only observations of this scientificName")
    ing.add_argument("--property", default="default", help="with --camtrap-dp: the property of its sites")
    ing.add_argument("--wait", action="store_true", help="wait until every detection is terminal")
    ing.add_argument("--json", help="write the report here")
    ing.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    ing.add_argument("--concurrency", type=int, default=4)
    ing.add_argument("--api-url")
    ing.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_ingest(args) -> int:
    from deer_reid.ingest import IngestRefused, ingest

    settings = settings_for(args)
    if args.camtrap_dp and args.detections:
        print("deer-reid ingest: --camtrap-dp and --detections are two different inputs; give one", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(ingest(
            api_url(settings, args.api_url), Path(args.path), site=args.site, fallback_site="default",
            camera=args.camera, captured_at=args.captured_at, wait=args.wait, timeout=args.timeout,
            concurrency=args.concurrency, progress=not args.quiet, headers=auth_headers(settings),
            max_image_bytes=settings.max_upload_bytes, detections=args.detections, min_conf=args.min_conf,
            cls=args.cls, cls_map=args.cls_map, camtrap_dp=args.camtrap_dp, taxon=args.taxon,
            prop=args.property))
    except (IngestRefused, FileNotFoundError) as exc:
        for message in getattr(exc, "messages", [str(exc)])[:50]:
            print(f"deer-reid ingest: refused: {message}", file=sys.stderr)
        return 2
    keep_json(report, args.json)
    source = report.get("megadetector") or report.get("camtrap_dp") or {}
    refused = source.get("refused_entries", []) + source.get("refused_rows", [])
    summary = {k: v for k, v in report.items() if k != "rejected"}
    summary["rejected"] = len(report["rejected"])
    for key in ("megadetector", "camtrap_dp"):
        if key in summary:
            summary[key] = {k: (len(v) if k.startswith("refused") else v) for k, v in summary[key].items()
                            if k != "images_without_entry_first"}
    print_json(summary)
    for r in report["rejected"][:10]:
        print(f"rejected {r['path']}: {r['status']} {r['error']}", file=sys.stderr)
    for message in refused[:20]:
        print(f"refused {message}", file=sys.stderr)
    unfinished = args.wait and report.get("terminal", 0) < report["submitted"]
    # a script around ingest must tell a clean run from one that left something behind
    return 1 if report["rejected"] or refused or unfinished else 0
