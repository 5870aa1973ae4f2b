"""The antler service's pure parts: geometry on drawn antlers, regions, seasons, bad input, and fusion's rules.

The drawn antlers check the geometry code (known tine counts and spreads), not its accuracy on photos,
for which no labelled antlers exist here.
"""
from __future__ import annotations

import io
import json
from datetime import datetime, timezone

import cv2
import numpy as np
import pytest
from PIL import Image

from services.antler import geometry
from services.antler.extractor import measure
from services.antler.fingerprint import projection
from services.antler.seasons import SeasonCalendar
from shared.components import antler as rules
from services.fusion.decision import REVIEW, Thresholds, decide
from services.fusion.scoring import Candidate

SKY = (200, 215, 235)
BROWN = (70, 55, 40)
CAL = SeasonCalendar()


def draw_buck(left: int = 3, right: int = 3, spread: float = 0.6, *, w: int = 300, h: int = 400,
              drop: bool = False, rack: bool = True, sky=SKY, colour=BROWN) -> np.ndarray:
    """A buck's head under a drawn rack: a main beam up and out on each side, its end one point, and the
    other points rising straight up from it, evenly spaced; `spread` is the rack's width over the box's."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = sky
    img[int(h * 0.3):] = (110, 95, 70)  # the body below the region
    rh, cx = int(h * 0.3), w // 2
    base_y = rh - 4
    cv2.ellipse(img, (cx, base_y + 40), (40, 45), 0, 0, 360, (120, 90, 60), -1)
    if rack:
        half = spread * w / 2
        for side, n in ((-1, left), (1, right)):
            bx = cx + side * 15
            tip = (int(cx + side * half), int(rh * 0.35))
            cv2.line(img, (bx, base_y), tip, colour, 4)
            for k in range(n - 1):
                t = (k + 1) / n
                px, py = int(bx + (tip[0] - bx) * t), int(base_y + (tip[1] - base_y) * t)
                cv2.line(img, (px, py), (px, max(3, py - int(rh * 0.45))), colour, 3)
            if drop and side == 1:
                mx, my = (bx + tip[0]) // 2, (base_y + tip[1]) // 2
                cv2.line(img, (mx, my), (mx + 25, my + 25), colour, 3)
    return img


def jpeg(rgb: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="JPEG", quality=95)
    return out.getvalue()


def geo_of(img: np.ndarray) -> geometry.Geometry:
    return geometry.measure(img, geometry.region_of(*img.shape[:2]))


@pytest.mark.parametrize("left,right,spread", [(3, 3, 0.6), (4, 2, 0.5), (2, 2, 0.8), (5, 5, 0.7)])
def test_points_and_spread_of_drawn_antlers(left, right, spread):
    g = geo_of(draw_buck(left, right, spread))
    assert g.present and (g.points_left, g.points_right) == (left, right)
    assert g.spread_ratio == pytest.approx(spread, abs=0.04)  # the beams' ends, plus their width
    assert g.spread_reference == "box-width" and not g.formations


def test_symmetry_falls_with_lopsided_racks_and_a_drop_tine_is_named():
    even, lopsided = geo_of(draw_buck(4, 4)), geo_of(draw_buck(4, 1))
    assert 0 <= lopsided.symmetry < even.symmetry <= 1
    dropped = geo_of(draw_buck(2, 2, 0.8, drop=True))
    assert "drop-tine" in dropped.formations and dropped.points_right == 3  # a drop tine is a point too
    assert "non-typical" in geo_of(draw_buck(5, 1)).formations


def test_antlers_against_dark_vegetation_are_found_too():
    g = geo_of(draw_buck(3, 3, sky=(40, 60, 35), colour=(215, 205, 185)))
    assert g.present and (g.points_left, g.points_right) == (3, 3)


def test_empty_sky_and_tiny_regions_are_answers_not_errors():
    assert (geo_of(draw_buck(rack=False)).present, geo_of(draw_buck(rack=False)).reason) == (False, "empty-region")
    tiny = geo_of(draw_buck(w=40, h=60))
    assert (tiny.present, tiny.reason) == (False, "region-too-small")


def test_region_from_confident_pose_keypoints_else_the_box_top():
    kp = np.zeros((17, 3))
    kp[geometry.LEFT_EYE] = (140, 200, 0.9)
    kp[geometry.RIGHT_EYE] = (160, 200, 0.9)
    kp[geometry.NECK] = (150, 260, 0.8)
    r = geometry.region_of(400, 300, kp)
    assert r.source == "keypoints" and r.y1 <= 210 and r.y0 < 200 and r.x0 < 140 < 160 < r.x1
    assert r.center_x == 150 and r.head_width == pytest.approx(50)
    kp[geometry.RIGHT_EYE, 2] = 0.3  # below the SPEC's 0.6: fall back
    fallback = geometry.region_of(400, 300, kp)
    assert (fallback.source, fallback.y0, fallback.y1, fallback.x1) == ("box-top", 0, 120, 300)


def test_seasons_and_the_casting_window():
    assert CAL.season(datetime(2024, 9, 1)) == "2024-rut"
    assert CAL.season(datetime(2025, 1, 31)) == "2024-rut"  # the rut season runs over New Year
    assert CAL.season(datetime(2025, 2, 1)) == "2025-velvet"
    assert CAL.season(datetime(2025, 8, 31)) == "2025-velvet"
    assert CAL.casting_window(datetime(2025, 2, 14)) == "2025-casting"
    assert CAL.casting_window(datetime(2025, 3, 31)) == "2025-casting"
    assert CAL.casting_window(datetime(2025, 4, 1)) is None
    custom = SeasonCalendar.parse("10-15", "12-31", [1, 2])
    assert custom.season(datetime(2024, 11, 1)) == "2024-rut" and custom.season(datetime(2024, 10, 1)) == "2024-velvet"
    with pytest.raises(ValueError):
        SeasonCalendar.parse("02-30", "01-31", [2])
    with pytest.raises(ValueError):
        SeasonCalendar.parse("09-01", "01-31", [13])


WHEN = datetime(2024, 10, 5, 7, 0, tzinfo=timezone.utc)


def test_bad_input_gives_a_clear_no_evidence():
    buck = jpeg(draw_buck())
    doe = measure(buck, "doe", 40, WHEN, CAL)
    assert (doe.status, doe.flags, doe.attributes["present"]) == ("no-evidence", ["not-antlered-class"], None)
    broken = measure(b"\xff\xd8 not a jpeg", "buck", 40, WHEN, CAL)
    assert (broken.status, broken.flags) == ("no-evidence", ["unreadable-crop"])
    sky = measure(jpeg(draw_buck(rack=False)), "buck", 40, WHEN, CAL)
    assert (sky.status, sky.flags[0], sky.attributes["present"]) == ("no-evidence", "empty-region", False)
    rear = measure(buck, "buck", 40, WHEN, CAL, viewpoint="rear")
    assert rear.flags == ["rear-view"]
    # the rack runs into the top of the photo (the box starts at its top edge): cut, unknown, no fingerprint
    cut = measure(jpeg(draw_buck(5, 5, 0.6, h=300)), "buck", 0, WHEN, CAL)
    assert (cut.status, cut.flags[0], cut.attributes["present"]) == ("no-evidence", "cut-by-frame", None)
    inside = measure(jpeg(draw_buck(5, 5, 0.6, h=300)), "buck", 40, WHEN, CAL)
    assert inside.status == "ok"  # the same rack in a box that starts inside the photo
    grey = cv2.cvtColor(cv2.cvtColor(draw_buck(), cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    ir = measure(jpeg(grey), "buck", 40, WHEN, CAL)
    assert ir.status == "ok" and "infrared" in ir.flags and ir.attributes["geometry"]["points_left"] == 3
    ok = measure(buck, "mature", 40, WHEN, CAL)
    assert ok.status == "ok" and ok.attributes["season"] == "2024-rut" and ok.region is not None


def test_projection_is_fixed_and_orthonormal():
    a, b = projection(1280), projection(1280)
    assert np.array_equal(a, b) and a.shape == (1280, 64)
    assert np.allclose(a.T @ a, np.eye(64), atol=1e-5)


def q(season="2024-rut", window=None, present=True, fp=(1.0, 0.0), when=WHEN, version="v1"):
    return rules.AntlerQuery(season, window, present, version, None if fp is None else np.asarray(fp), when)


def a(season="2024-rut", window=None, present=True, fp=(1.0, 0.0), when=WHEN, version="v1"):
    return rules.Archived(season, window, present, version, None if fp is None else np.asarray(fp), when)


def test_fingerprints_are_compared_only_within_one_season_and_version():
    archive = [a(fp=(1, 0)), a(fp=(0, 1)), a(season="2023-rut", fp=(1, 0)), a(version="v0", fp=(1, 0)),
               a(present=False, fp=None)]
    assert rules.candidate_scores(q(), archive) == pytest.approx([1.0, 0.0])
    assert rules.candidate_scores(q(window="2025-casting"), archive) == []  # the casting window: no antler score
    assert rules.candidate_scores(q(present=False, fp=None), archive) == []


def test_casting_window_flag_and_possible_duplicates():
    early, late = datetime(2025, 2, 10, tzinfo=timezone.utc), datetime(2025, 3, 10, tzinfo=timezone.utc)
    window = "2025-casting"
    # antlers seen after the same candidate was seen without: two bucks, or a wrong photo
    seen_without = [a(season="2025-velvet", window=window, present=False, fp=None, when=early)]
    query = q(season="2025-velvet", window=window, when=late)
    assert rules.flags_for(query, seen_without, [], 0.4) == [rules.TRANSITION, rules.DUPLICATE]
    # without antlers after being seen with them: he cast them, as bucks do
    seen_with = [a(season="2025-velvet", window=window, when=early)]
    assert rules.flags_for(q(season="2025-velvet", window=window, present=False, fp=None, when=late), seen_with,
                           [], 0.4) == [rules.TRANSITION]
    # an unreadable region says nothing either way
    assert rules.flags_for(q(season="2025-velvet", window=window, present=None, fp=None, when=late),
                           seen_without, [], 0.4) == [rules.TRANSITION]
    # in season: a body match whose antlers disagree
    assert rules.flags_for(q(), [a(fp=(0, 1))], [0.1], 0.4) == [rules.DUPLICATE]
    assert rules.flags_for(q(), [a(fp=(1, 0))], [0.9], 0.4) == []


def test_a_possible_duplicate_goes_to_review_never_merged():
    flagged = Candidate(7, 0.95, {"body:m": 0.95}, {}, {}, 0.0, (rules.DUPLICATE,))
    decision = decide([flagged], Thresholds(match=0.8, new=0.6))
    assert decision.state == REVIEW and "possible-duplicate-profile" in decision.flags
    weak = Candidate(7, 0.3, {"body:m": 0.3}, {}, {}, 0.0, (rules.DUPLICATE,))
    assert decide([weak], Thresholds(match=0.8, new=0.6)).state == "new"  # no body match: nothing to duplicate


def test_a_possible_duplicate_flag_keeps_the_candidates_score_and_temporal_boost():
    """The flag was added by rebuilding the candidate with a boost of 0 while keeping its boosted score, so
    the identity graph's edge (score minus boost) carried the temporal boost as evidence."""
    from services.fusion.scoring import with_temporal_boost
    from services.fusion.service import FusionHandler
    from shared.config import Settings

    fusion = FusionHandler.__new__(FusionHandler)  # the flag rule needs only the settings
    fusion.settings = Settings()
    boosted = with_temporal_boost(Candidate(7, 0.80, {"body:m": 0.80}), 0.05, ())
    antler = {"query": q(), "archives": {7: [a(fp=(0, 1))]}, "scores": {7: [0.1]}}
    [flagged] = fusion._antler_flags(antler, [boosted], new_threshold=0.6)
    assert rules.DUPLICATE in flagged.flags
    assert (flagged.score, flagged.temporal_boost) == (pytest.approx(0.85), pytest.approx(0.05))
    assert flagged.score - flagged.temporal_boost == pytest.approx(0.80)  # what the graph's edge records


def test_antler_similarity_keeps_seasons_apart():
    sightings = [a(season=season, fp=fp) for season, fp in
                 (("2024-rut", (1.0, 0)), ("2025-rut", (1.0, 0)), ("2024-rut", None), ("2024-rut", (0, 1.0)))]
    m = rules.SIMILARITY.similarity(sightings, sightings)
    assert np.isnan(m[0, 1]) and np.isnan(m[0, 2]) and m[0, 3] == pytest.approx(0.0) and m[0, 0] == pytest.approx(1.0)


# --- on the real stack -------------------------------------------------------------------------------


def buck_photo(nyala_path, rack: bool, variant: int = 0) -> bytes:
    """A real nyala photo under a sky band with a drawn rack (or none): the body is real, the rack known.
    `variant` re-encodes at another quality, so that each upload is a new image (uploads are content-addressed)."""
    with Image.open(nyala_path) as im:
        body = np.array(im.convert("RGB").resize((300, 280)))
    img = draw_buck(3, 3, 0.6, rack=rack)
    img[120:] = body
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=95 - variant)
    return out.getvalue()


async def test_season_archive_casting_window_and_possible_duplicate_on_the_stack(stack, db, nyala_paths):
    import httpx

    from deer_reid.ingest import wait_terminal
    from tests.stack_helpers import WAIT_S, register

    await register(stack, "antler-cam", "antler-herd")
    box = json.dumps([{"box": [0, 2, 300, 400], "cls": "buck"}])  # a detector's box, inside the photo
    photo = nyala_paths[1150]

    async with httpx.AsyncClient(base_url=stack.api_url, timeout=60, headers=stack.auth) as client:
        before = (await client.get("/v1/config")).json()
        await client.put("/v1/config", json={"mode": "enhanced", "antler": True, "coat": True})  # with coat: both join

        async def upload(when: str, rack: bool, variant: int) -> dict:
            r = await client.post("/v1/uploads", data={"site": "antler-cam", "captured_at": when, "detections": box},
                                  files=[("files", (f"b{variant}.jpg", buck_photo(photo, rack, variant), "image/jpeg"))])
            assert r.status_code == 201, r.text
            det = r.json()["images"][0]["detections"][0]["id"]
            await wait_terminal(stack.api_url, [det], timeout=WAIT_S, progress=False)
            return (await client.get(f"/v1/detections/{det}")).json()

        try:
            first = await upload("2024-10-01T07:00:00Z", True, 0)
            assert first["state"] == "new" and first["result"]["antler"]["present"] is True
            buck = first["individual_id"]
            # the same buck days later, same season: antlers compared with his archived rack
            again = await upload("2024-10-03T07:00:00Z", True, 1)
            assert again["state"] == "assigned" and again["individual_id"] == buck, again["result"]["flags"]
            assert again["result"]["antler"]["candidates_compared"] == 1
            assert again["result"]["candidates"][0]["components"]["antler"]["raw"] > 0.9
            # a year on, a new season: last year's rack is never compared
            next_year = await upload("2025-10-02T07:00:00Z", True, 2)
            assert next_year["result"]["antler"]["season"] == "2025-rut"
            assert next_year["result"]["antler"]["candidates_compared"] == 0
            assert next_year["result"]["candidates"][0]["components"].get("antler", {}).get("raw") is None
            # the casting window: flagged, decided on the body alone; seen without antlers
            cast = await upload("2026-02-10T07:00:00Z", False, 3)
            assert "antler-seasonal-transition" in cast["result"]["flags"]
            assert cast["result"]["antler"]["present"] is False
            if cast["individual_id"] != buck or cast["state"] not in ("assigned", "new"):
                # a person places it with him (a review decision) where the body alone was not enough
                r = await client.post(f"/v1/detections/{cast['id']}/reassign",
                                      json={"action": "assign", "individual_id": buck})
                assert r.status_code == 200, r.text
            # antlers again later in the same window: a buck does not regrow a rack in a month
            regrown = await upload("2026-03-10T07:00:00Z", True, 4)
            assert regrown["state"] == "review", regrown["result"]["flags"]
            assert {"possible-duplicate-profile", "antler-seasonal-transition"} <= set(regrown["result"]["flags"])
            assert regrown["individual_id"] is None  # nothing merged, nothing founded
        finally:
            await client.put("/v1/config", json={k: before[k] for k in ("mode", "antler", "coat")})
        # the archive, by season, for the profile (API and page)
        history = (await client.get(f"/v1/individuals/{buck}")).json()["antler_history"]
        page = await client.get(f"/ui/individuals/{buck}")
        assert page.status_code == 200 and "Antlers by season" in page.text and "2024-rut" in page.text
    seasons = {h["season"]: h for h in history}
    assert (seasons["2024-rut"]["sightings"], seasons["2024-rut"]["with_antlers"]) == (2, 2)
    assert seasons["2024-rut"]["points_left"] == 3 and seasons["2024-rut"]["best_photo"]
    assert (seasons["2026-velvet"]["sightings"], seasons["2026-velvet"]["with_antlers"]) == (1, 0)
    rows = await db.fetch("SELECT season, casting_window, present FROM antler_fingerprints a JOIN detections d "
                          "ON d.id = a.detection_id WHERE d.property = 'antler-herd' ORDER BY a.captured_at")
    assert [tuple(r) for r in rows] == [("2024-rut", None, True), ("2024-rut", None, True), ("2025-rut", None, True),
                                       ("2026-velvet", "2026-casting", False),
                                       ("2026-velvet", "2026-casting", True)]
