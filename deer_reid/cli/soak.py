"""soak: drive the running stack with many distinct detections, optionally with faults, and account for
every one."""
from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from deer_reid.cli.context import settings_for
from deer_reid.cli.output import keep_json, print_json
from deer_reid.cli.parsing import add_command
from deer_reid.client import auth_headers


def register(commands) -> None:
    so = add_command(commands, "soak", cmd_soak, help="drive the running stack with N distinct detections "
                     "(optionally with faults) and account for every one")
    so.add_argument("detections", type=int)
    so.add_argument("--photos", required=True, help="a folder of real photos the distinct images are made from")
    so.add_argument("--rate", type=float, help="detections per second (default: all at once, one backlog)")
    so.add_argument("--faults", action="store_true",
                    help="SIGKILL each service once, the broker and the embedded PostgreSQL, spread out")
    so.add_argument("--mode", choices=("enhanced", "fast"),
                    help="set the stack's switches for the run (enhanced: coat, pose, antler and temporal on) and "
                         "put the previous ones back after it (default: run under the switches as they are)")
    so.add_argument("--concurrency", type=int, default=4)
    so.add_argument("--timeout", type=float, default=86400, help="give up waiting for decisions after this")
    so.add_argument("--seed", type=int)
    so.add_argument("--json")
    so.add_argument("--quiet", action="store_true")


def cmd_soak(args) -> int:
    import httpx

    from deer_reid.soak import exit_status, soak

    settings = settings_for(args)
    try:
        report = asyncio.run(soak(settings.home, Path(args.photos), args.detections, dsn=settings.database_url or None,
                                  rate=args.rate, faults=args.faults, concurrency=args.concurrency,
                                  timeout=args.timeout, seed=args.seed, headers=auth_headers(settings),
                                  progress=not args.quiet, mode=args.mode))
    except (RuntimeError, httpx.HTTPError) as exc:  # no stack, no photos, or the API refused the switches
        print(f"deer-reid soak: {exc}", file=sys.stderr)
        return 2
    keep_json(report, args.json)
    print_json(report)
    return exit_status(report)
