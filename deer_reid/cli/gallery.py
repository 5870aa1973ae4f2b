"""gallery: re-choose the exemplars fusion compares new detections with."""
from __future__ import annotations

import asyncio

from deer_reid.cli.context import database_url_for, settings_for
from deer_reid.cli.output import print_json
from deer_reid.cli.parsing import add_action, add_actions, add_command


def register(commands) -> None:
    ga = add_command(commands, "gallery", cmd_gallery, help="the gallery of exemplars")
    ga_sub = add_actions(ga)
    ga_re = add_action(ga_sub, "rebuild", help="re-choose every individual's exemplars")
    ga_re.add_argument("--property", help="only this property")
    ga_re.add_argument("--quiet", action="store_true")


def cmd_gallery(args) -> int:
    from deer_reid.gallery import rebuild

    settings = settings_for(args)
    report = asyncio.run(rebuild(database_url_for(settings), settings.exemplars_per_individual,
                                 prop=args.property, progress=not args.quiet))
    print_json(report)
    return 0
