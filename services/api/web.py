"""The web page: the review queue, census questions, individuals and their profiles, the audit log with undo.

Server-rendered (Jinja2, autoescaped: whatever people type in a name or a note is shown as text) from
the same read functions as the API; the buttons call the API with `fetch`. No CDN: the one style
sheet and the one script are served from here, so the page works on a laptop in the field.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Depends, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape

from services.api import browse, census
from services.api.auth import COOKIE, Principal, principal_of, requires
from services.api.deps import Config, Pool

HERE = Path(__file__).parent
templates = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(["html"]))
router = APIRouter(prefix="/ui", include_in_schema=False)


def mount_static(app) -> None:
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="static")


_read = requires("read")


async def page_reader(request: Request, settings: Config) -> Principal | None:
    """The signed-in reader, or None (the page then sends the browser to the sign-in form)."""
    try:
        return await _read(request, settings)
    except HTTPException:
        return None


Viewer = Annotated[Principal | None, Depends(page_reader)]


def render(name: str, who: Principal | None, **context) -> HTMLResponse:
    return HTMLResponse(templates.get_template(name).render(who=who, **context),
                        headers={"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                                                            "style-src 'self'; script-src 'self'",
                                 "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"})


def to_login(request: Request) -> RedirectResponse:
    return RedirectResponse(f"/ui/login?next={request.url.path}", status_code=303)


@router.get("")
@router.get("/")
async def home(request: Request, pool: Pool, who: Viewer):
    """The review queue; before any photo came in, how to bring them in."""
    if await pool.fetchval("SELECT EXISTS (SELECT 1 FROM detections)"):
        return RedirectResponse("/ui/review", status_code=303)
    return render("start.html", who, api_url=str(request.base_url).rstrip("/"))


@router.get("/login")
async def login_form(request: Request, next: str = "/ui/review", error: str | None = None):
    return render("login.html", None, next=next if next.startswith("/ui/") else "/ui/review", error=error)


@router.post("/login")
async def login(pool: Pool, key: Annotated[str, Form(max_length=200)], next: Annotated[str, Form()] = "/ui/review"):
    principal = await principal_of(pool, key.strip())
    if principal is None:
        return RedirectResponse("/ui/login?error=unknown+or+revoked+key", status_code=303)
    target = next if next.startswith("/ui/") and "//" not in next else "/ui/review"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(COOKIE, key.strip(), httponly=True, samesite="strict", max_age=30 * 86400, path="/")
    return response


@router.post("/logout")
async def logout() -> Response:
    response = RedirectResponse("/ui/login", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/review")
async def review_page(request: Request, pool: Pool, who: Viewer, order: Literal["oldest", "uncertain"] = "oldest",
                      skip: int = 0, property: str | None = None):
    if who is None:
        return to_login(request)
    queue = await browse.review_queue(pool, prop=property, order=order, flagged=True, limit=1, offset=max(0, skip))
    return render("review.html", who, item=queue["items"][0] if queue["items"] else None, total=queue["total"],
                  order=order, skip=max(0, skip), property=property)


@router.get("/census")
async def census_page(request: Request, pool: Pool, who: Viewer, property: str = "default"):
    """Question mode: one pair at a time, answered with one key."""
    if who is None:
        return to_login(request)
    async with pool.acquire() as conn:
        try:
            standing = await census.standing(conn, property)
        except HTTPException:
            return render("missing.html", who, what=f"property {property}")
        q = await census.next_question(conn, property)
        question = None if q is None else await census.question_view(conn, q)
    return render("census.html", who, census=standing, q=question, property=property)


@router.get("/individuals")
async def individuals_page(request: Request, pool: Pool, who: Viewer, q: str | None = None, page: int = 0,
                           property: str | None = None):
    if who is None:
        return to_login(request)
    found = await browse.list_individuals(pool, prop=property, site=None, sex=None, cls=None, seen_from=None,
                                          seen_to=None, min_sightings=0, flag=None, q=q or None,
                                          include_merged=False, limit=48, offset=48 * max(0, page))
    return render("individuals.html", who, found=found, q=q or "", page=max(0, page))


@router.get("/individuals/{individual_id}")
async def profile_page(request: Request, individual_id: int, pool: Pool, who: Viewer):
    if who is None:
        return to_login(request)
    found = await browse.profile(pool, individual_id)
    if found is None:
        return render("missing.html", who, what=f"individual {individual_id}")
    entries = await browse.audit(pool, limit=20, offset=0, individual=individual_id)
    return render("profile.html", who, ind=found, audit=entries, peak=max(found["hours"]) or 1)


@router.get("/detections/{detection_id}")
async def detection_page(request: Request, detection_id: UUID, pool: Pool, who: Viewer):
    if who is None:
        return to_login(request)
    row = await pool.fetchrow("SELECT id, site, camera, captured_at, state, individual_id, score, decided_by, result "
                              "FROM detections WHERE id = $1", detection_id)
    if row is None:
        return render("missing.html", who, what=f"detection {detection_id}")
    entries = await browse.audit(pool, limit=20, offset=0, detection=detection_id)
    return render("detection.html", who, det=row, flags=(row["result"] or {}).get("flags", []), audit=entries)


@router.get("/audit")
async def audit_page(request: Request, pool: Pool, who: Viewer, page: int = 0):
    if who is None:
        return to_login(request)
    entries = await browse.audit(pool, limit=50, offset=50 * max(0, page))
    return render("audit.html", who, audit=entries, page=max(0, page))


@router.get("/stats")
async def stats_page(request: Request, pool: Pool, who: Viewer):
    if who is None:
        return to_login(request)
    return render("stats.html", who, stats=await browse.statistics(pool))
