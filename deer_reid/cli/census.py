"""census: re-cluster a property's identity graph, or see where its census stands."""
from __future__ import annotations

from deer_reid.cli.context import api, settings_for
from deer_reid.cli.output import print_json, reported
from deer_reid.cli.parsing import add_action, add_actions, add_command
from deer_reid.client import api_url, auth_headers


def register(commands) -> None:
    ce = add_command(commands, "census", cmd_census,
                     help="the identity graph: re-cluster a property, or see where its census stands")
    ce_sub = add_actions(ce)
    ce_re = add_action(ce_sub, "recluster", help="re-solve the property's identity graph now and wait for the run")
    ce_re.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the census service")
    ce_st = add_action(ce_sub, "status", help="individuals, questions left, answers, the calibration in force")
    for p in (ce_re, ce_st):
        p.add_argument("--property", default="default")
        p.add_argument("--api-url")


def cmd_census(args) -> int:
    import httpx

    from deer_reid.census import recluster

    if args.action == "status":
        print_json(api(args, "GET", f"/v1/census/{args.property}"))
        return 0
    settings = settings_for(args)
    with httpx.Client(base_url=api_url(settings, args.api_url), headers=auth_headers(settings), timeout=60) as client:
        return reported("census recluster", lambda: recluster(client, args.property, timeout=args.timeout),
                        (RuntimeError, httpx.HTTPError), refused_exit=1)
