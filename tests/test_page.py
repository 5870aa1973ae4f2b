"""The web page in a real browser (Debian's headless Chromium, driven by Selenium) against the real stack.

A person signs in with the link `deer-reid page` prints, confirms a detection from the review queue with
one key press, merges two individuals on a profile, undoes the merge, and the database shows each step.
Screenshots are kept in reports/screenshots/ (DEER_TEST_ARTIFACTS overrides) as the test's artefacts.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from urllib.parse import quote

import pytest

from deer_reid.ingest import wait_terminal
from tests.conftest import REPO
from tests.stack_helpers import WAIT_S, ingest, until

PROP = "page"
ARTIFACTS = Path(os.environ.get("DEER_TEST_ARTIFACTS", REPO / "reports" / "screenshots"))


@pytest.fixture(scope="module")
async def page_herd(stack, nyala_rows, nyala_paths):
    chosen: dict[str, list[int]] = {}
    for i in range(1040, 1100):
        ident = nyala_rows[i]["identity"]
        if ident in ("81", "82", "84") and len(chosen.setdefault(ident, [])) < 4:
            chosen[ident].append(i)
    ids = []
    for k, i in enumerate(i for ident in sorted(chosen) for i in chosen[ident]):
        ids += await ingest(stack, [nyala_paths[i]], "page-cam", fallback_captured_at=f"2025-10-1{k % 9}T1{k % 9}:00:00Z",
                            prop=PROP)
    await wait_terminal(stack.api_url, ids, timeout=WAIT_S, progress=False)
    return ids


# What the page shows: a page answers fast, so it is looked at often and waited for 20 s at most.
shown = functools.partial(until, timeout=20.0, every=0.1)


def shot(driver, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


async def test_review_confirm_merge_and_undo_in_a_real_browser(stack, page_herd, browser, db):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    async def row(detection):
        return await db.fetchrow("SELECT state, individual_id, decided_by FROM detections WHERE id = $1", detection)

    waiting = await db.fetchval("SELECT count(*) FROM detections WHERE property = $1 AND state = 'review'", PROP)
    assert waiting, "the page's herd produced nothing to review"

    # sign in with the link `deer-reid page` prints: the key travels in the fragment
    browser.get(f"{stack.api_url}/ui/login?next={quote(f'/ui/review?property={PROP}')}#key={quote(stack.admin_key)}")
    await shown(lambda: "/ui/review" in browser.current_url, what="the sign-in to land on the review queue")
    review = (await shown(lambda: browser.find_elements(By.ID, "review"), what="a detection to review"))[0]
    detection = review.get_attribute("data-detection")
    first = browser.find_element(By.ID, "candidate-1").get_attribute("data-individual")
    assert browser.find_element(By.ID, "queue-total").text == str(waiting)
    shot(browser, "review-queue")

    # one key press confirms the selected (first) candidate
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ENTER)
    await until(lambda: row(detection), lambda r: r["decided_by"] == "human")
    r = await row(detection)
    assert (r["state"], r["individual_id"]) == ("assigned", int(first))
    await shown(lambda: browser.find_elements(By.ID, "queue-empty") or (
        browser.find_elements(By.ID, "review") and
        browser.find_element(By.ID, "review").get_attribute("data-detection") != detection),
        what="the next detection")

    # the confirmed individual's profile; merge another individual of the property into it
    keep = int(first)
    absorb = await db.fetchval("SELECT id FROM individuals WHERE property = $1 AND id <> $2 AND sightings > 0 "
                               "AND merged_into IS NULL ORDER BY id LIMIT 1", PROP, keep)
    moved = {x["id"] for x in await db.fetch("SELECT id FROM detections WHERE individual_id = $1", absorb)}
    note = '<img src=x onerror="document.title=\'owned\'"> Big 8'
    await db.execute("UPDATE individuals SET notes = $2, name = 'Split G2' WHERE id = $1", keep, note)
    browser.get(f"{stack.api_url}/ui/individuals/{keep}")
    assert "Split G2" in browser.find_element(By.ID, "individual-name").text
    assert browser.find_element(By.ID, "notes-view").text == note and browser.title != "owned"
    shot(browser, "profile")
    browser.find_element(By.ID, "merge-id").send_keys(str(absorb))
    browser.find_element(By.CSS_SELECTOR, "#merge-form button").click()
    await until(lambda: db.fetchval("SELECT merged_into FROM individuals WHERE id = $1", absorb), lambda v: v == keep)
    assert {x["id"] for x in await db.fetch("SELECT id FROM detections WHERE individual_id = $1", keep)} >= moved
    merge_id = await db.fetchval("SELECT max(id) FROM audit_log WHERE action = 'merge'")

    # undo the merge from the profile's list of changes
    button = (await shown(lambda: browser.find_elements(By.ID, f"undo-{merge_id}"),
                          what="the merge's undo button"))[0]
    shot(browser, "profile-after-merge")
    button.click()
    await until(lambda: db.fetchval("SELECT merged_into FROM individuals WHERE id = $1", absorb), lambda v: v is None)
    assert {x["id"] for x in await db.fetch("SELECT id FROM detections WHERE individual_id = $1", absorb)} == moved
    assert await db.fetchval("SELECT undone_by FROM audit_log WHERE id = $1", merge_id) is not None
    await shown(lambda: "undone by" in browser.page_source, what="the page to show the undo")
    shot(browser, "profile-after-undo")

    # the other pages render for a signed-in person
    for path, marker in (("/ui/individuals", "Individuals"), ("/ui/audit", "Changes by people"),
                         ("/ui/stats", "Timings per stage")):
        browser.get(stack.api_url + path)
        assert marker in browser.page_source
    shot(browser, "statistics")
