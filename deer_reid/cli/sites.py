"""sites: camera sites and the property (population) each belongs to."""
from __future__ import annotations

from deer_reid.cli.context import api
from deer_reid.cli.output import print_json
from deer_reid.cli.parsing import add_action, add_actions, add_command


def register(commands) -> None:
    si = add_command(commands, "sites", cmd_sites, help="camera sites and the property (population) each belongs to")
    si_sub = add_actions(si)
    si_add = add_action(si_sub, "add", help="register a site, or move one that has no detections yet")
    si_add.add_argument("name")
    si_add.add_argument("--property", default="default", help="the population it belongs to (default: default)")
    si_add.add_argument("--lat", type=float, help="latitude (temporal conflicts need coordinates)")
    si_add.add_argument("--lon", type=float)
    si_list = add_action(si_sub, "list", help="every site with its property, coordinates and detections")
    for p in (si_add, si_list):
        p.add_argument("--api-url")


def cmd_sites(args) -> int:
    if args.action == "add":
        body = {"property": args.property, "lat": args.lat, "lon": args.lon}
        print_json(api(args, "PUT", f"/v1/sites/{args.name}", json=body))
        return 0
    sites = api(args, "GET", "/v1/sites")["sites"]
    print(f"{'site':24s} {'property':16s} {'lat':>10s} {'lon':>11s} {'detections':>10s}")
    for s in sites:
        lat = f"{s['lat']:.5f}" if s["lat"] is not None else "-"
        lon = f"{s['lon']:.5f}" if s["lon"] is not None else "-"
        print(f"{s['name']:24s} {s['property']:16s} {lat:>10s} {lon:>11s} {s['detections']:>10d}")
    return 0
