"""Who may use the stack: keys (create, list, revoke API keys) and page (a link that signs in)."""
from __future__ import annotations

import asyncio
import sys

from deer_reid.cli.context import database_url_for, settings_for
from deer_reid.cli.parsing import add_action, add_actions, add_command
from deer_reid.client import api_key, api_url


def register(commands) -> None:
    ke = add_command(commands, "keys", cmd_keys,
                     help="API keys: create, list, revoke (needs the database, as an administrator)")
    ke_sub = add_actions(ke)
    ke_new = add_action(ke_sub, "create", help="a new key, printed once")
    ke_new.add_argument("--owner", required=True, help="who uses it: the audit log records this name")
    ke_new.add_argument("--scope", choices=["read", "review", "admin"], default="review")
    add_action(ke_sub, "list", help="every key (hashes only are stored)")
    ke_rev = add_action(ke_sub, "revoke", help="revoke a key by its id (`keys list` shows them)")
    ke_rev.add_argument("id", type=int)

    pg = add_command(commands, "page", cmd_page,
                     help="print the web page's address, with a link that signs in with the local key")
    pg.add_argument("--api-url")


def cmd_keys(args) -> int:
    """API keys live in the database: managing them needs the database, not a key."""
    from services.api import auth
    from shared.db import create_pool

    settings = settings_for(args)

    async def run():
        pool = await create_pool(database_url_for(settings), max_size=1)
        try:
            if args.action == "create":
                key_id, token = await auth.create_key(pool, args.owner, args.scope)
                print(f"key {key_id} for {args.owner} ({args.scope}); it is shown once, keep it now:\n{token}")
            elif args.action == "list":
                print(f"{'id':>4s} {'prefix':9s} {'owner':24s} {'scope':7s} {'created':20s} {'last used':20s} revoked")
                for k in await auth.list_keys(pool):
                    def t(v):
                        return v.strftime("%Y-%m-%d %H:%M:%S") if v else "-"
                    print(f"{k['id']:>4d} {k['prefix']:9s} {k['owner'][:24]:24s} {k['scope']:7s} {t(k['created_at']):20s} "
                          f"{t(k['last_used_at']):20s} {t(k['revoked_at'])}")
            elif not await auth.revoke_key(pool, args.id):
                raise SystemExit(f"deer-reid keys: no unrevoked key {args.id}")
            else:
                print(f"key {args.id} revoked")
        finally:
            await pool.close()

    try:
        asyncio.run(run())
    except ValueError as exc:
        print(f"deer-reid keys: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_page(args) -> int:
    """The page's address, signed in with the local key (the key travels in the fragment, never to a log)."""
    from urllib.parse import quote

    settings = settings_for(args)
    url = api_url(settings, args.api_url) + "/ui/login"
    key = api_key(settings)
    print(f"{url}#key={quote(key)}" if key else url)
    return 0
