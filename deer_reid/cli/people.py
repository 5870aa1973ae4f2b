"""The work of people on identifications, through the API: individuals (browse, name, merge, split) and
review (the queue's decisions, and undoing any change)."""
from __future__ import annotations

from deer_reid.cli.context import api
from deer_reid.cli.output import print_json
from deer_reid.cli.parsing import add_action, add_actions, add_command


def register(commands) -> None:
    iv = add_command(commands, "individuals", cmd_individuals, help="browse, name, merge and split individuals")
    iv_sub = add_actions(iv)
    iv_list = add_action(iv_sub, "list",
                         help="individuals with their sightings, sex, first and last seen, sites and tags")
    iv_list.add_argument("--q", help="name, tag, note or id")
    iv_list.add_argument("--property")
    iv_list.add_argument("--site")
    iv_list.add_argument("--min-sightings", type=int)
    iv_list.add_argument("--limit", type=int, default=50)
    iv_show = add_action(iv_sub, "show", help="one individual: its sites, hours, similar individuals and sightings")
    iv_show.add_argument("id", type=int)
    iv_show.add_argument("--limit", type=int, default=20, help="sightings to print")
    iv_show.add_argument("--json", action="store_true")
    iv_name = add_action(iv_sub, "name", help="name, tags and notes")
    iv_name.add_argument("id", type=int)
    iv_name.add_argument("name", nargs="?", default="", help="empty removes the name")
    iv_name.add_argument("--tags", help="comma-separated; replaces the tags")
    iv_name.add_argument("--notes")
    iv_merge = add_action(iv_sub, "merge", help="KEEP absorbs ABSORB's sightings")
    iv_merge.add_argument("keep", type=int)
    iv_merge.add_argument("absorb", type=int)
    iv_split = add_action(iv_sub, "split", help="the given detections of ID become a new individual")
    iv_split.add_argument("id", type=int)
    iv_split.add_argument("detections", nargs="+")
    iv_split.add_argument("--name")
    for p in (iv_name, iv_merge, iv_split):
        p.add_argument("--reason", default="")
    for p in (iv_list, iv_show, iv_name, iv_merge, iv_split):
        p.add_argument("--api-url")

    rv = add_command(commands, "review", cmd_review, help="work the review queue; undo changes")
    rv_sub = add_actions(rv)
    rv_list = add_action(rv_sub, "list", help="the detections waiting, each with its candidates")
    rv_list.add_argument("--limit", type=int, default=20)
    rv_next = add_action(rv_sub, "next", help="the first detection waiting, with its candidates")
    for p in (rv_list, rv_next):
        p.add_argument("--order", choices=["oldest", "uncertain"], default="oldest")
    rv_confirm = add_action(rv_sub, "confirm", help="the individual fusion suggested (or --individual among them)")
    rv_assign = add_action(rv_sub, "assign", help="another individual")
    rv_new = add_action(rv_sub, "new", help="a new individual")
    for p in (rv_confirm, rv_assign, rv_new):
        p.add_argument("detection")
        p.add_argument("--reassign", action="store_true", help="override a person's earlier decision")
        p.add_argument("--reason", default="")
        p.set_defaults(individual=None)
    rv_confirm.add_argument("--individual", type=int)
    rv_assign.add_argument("individual", type=int)
    rv_undo = add_action(rv_sub, "undo", help="undo a change by its audit id (`review log` lists them)")
    rv_undo.add_argument("audit_id", type=int)
    rv_undo.add_argument("--reason", default="")
    rv_log = add_action(rv_sub, "log", help="the newest changes by people")
    rv_log.add_argument("--limit", type=int, default=30)
    for p in (rv_list, rv_next, rv_confirm, rv_assign, rv_new, rv_undo, rv_log):
        p.add_argument("--api-url")


def _label(ind: dict, key: str = "id") -> str:
    """An individual as people know it: its name and number, or its number alone."""
    return f"{ind.get('name')} (#{ind[key]})" if ind.get("name") else f"#{ind[key]}"


def _print_change(change: dict) -> None:
    moved = change["after"]["detections"]
    founded = change["after"].get("founded")
    print(f"change {change['audit_id']}: {change['action']}, {len(moved)} detection(s)"
          + (f", founded #{founded}" if founded else "") + f"  (undo: deer-reid review undo {change['audit_id']})")


def cmd_individuals(args) -> int:
    if args.action == "list":
        params = {k: v for k, v in (("q", args.q), ("property", args.property), ("site", args.site),
                                    ("min_sightings", args.min_sightings), ("limit", args.limit)) if v}
        found = api(args, "GET", "/v1/individuals", params=params)
        print(f"{found['total']} individuals")
        for i in found["individuals"]:
            print(f"{_label(i):32s} {i['sightings']:>5d} sightings  {i['sex']:7s} {i['first_seen'][:10]} .. "
                  f"{i['last_seen'][:10]}  {','.join(i['sites'])[:40]}  {' '.join(i['tags'])}")
    elif args.action == "show":
        p = api(args, "GET", f"/v1/individuals/{args.id}")
        if args.json:
            print_json(p)
            return 0
        print(f"{_label(p)}  {p['sightings']} sightings, {p['sex']}, {p['first_seen'][:10]} .. {p['last_seen'][:10]}"
              + (f"  (merged into #{p['merged_into']})" if p["merged_into"] else ""))
        if p["tags"] or p["notes"]:
            print(f"tags: {', '.join(p['tags'])}\nnotes: {p['notes']}")
        print("sites: " + ", ".join(f"{s['site']} ({s['sightings']})" for s in p["sites"]))
        print("hours: " + " ".join(f"{h}:{n}" for h, n in enumerate(p["hours"]) if n))
        for s in p["similar"]:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in s["components"].items())
            print(f"similar: {_label(s, 'individual_id')} {s['score']:.3f} ({parts})")
        for t in p["timeline"][:args.limit]:
            print(f"  {t['captured_at'][:19]} {t['site']:16s} {t['detection']} {t['viewpoint']:12s} "
                  f"by {t['decided_by']}")
    elif args.action == "name":
        body = {"name": args.name or None, "reason": args.reason}
        if args.tags is not None:
            body["tags"] = [t for t in args.tags.split(",") if t.strip()]
        if args.notes is not None:
            body["notes"] = args.notes
        _print_change(api(args, "PATCH", f"/v1/individuals/{args.id}", json=body))
    elif args.action == "merge":
        _print_change(api(args, "POST", "/v1/individuals/merge",
                          json={"keep": args.keep, "absorb": args.absorb, "reason": args.reason}))
    elif args.action == "split":
        _print_change(api(args, "POST", f"/v1/individuals/{args.id}/split",
                          json={"detections": args.detections, "reason": args.reason, "name": args.name}))
    return 0


def cmd_review(args) -> int:
    if args.action in ("list", "next"):
        queue = api(args, "GET", "/v1/review", params={"order": args.order, "limit": 1 if args.action == "next"
                                                       else args.limit})
        print(f"{queue['total']} waiting ({queue['order']} first)")
        for item in queue["items"]:
            print(f"{item['detection']}  {item['captured_at'][:19]} {item['site']}/{item['camera']} {item['cls']} "
                  f"{item['state']}  flags: {', '.join(item['flags'])}")
            for rank, c in enumerate(item["candidates"], 1):
                parts = ", ".join(f"{k} {v['raw']:.3f}" for k, v in c["components"].items() if v["raw"] is not None)
                print(f"   {rank}. {_label(c, 'individual_id'):28s} score {c['score']:.3f}  {c.get('sightings', 0)} "
                      f"sightings  ({parts})")
    elif args.action in ("confirm", "assign", "new"):
        body = {"action": args.action, "individual_id": args.individual, "reason": args.reason}
        path = "reassign" if args.reassign else "decision"
        _print_change(api(args, "POST", f"/v1/detections/{args.detection}/{path}", json=body))
    elif args.action == "undo":
        _print_change(api(args, "POST", f"/v1/audit/{args.audit_id}/undo", json={"reason": args.reason}))
    elif args.action == "log":
        for e in api(args, "GET", "/v1/audit", params={"limit": args.limit})["entries"]:
            state = f"undone by {e['undone_by']}" if e["undone_by"] else ""
            print(f"{e['id']:>5d} {e['at'][:19]} {e['actor'][:20]:20s} {e['action']:16s} "
                  f"{len(e['after']['detections']):>4d} det  {e['reason'][:40]:40s} {state}")
    return 0
