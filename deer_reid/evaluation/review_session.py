"""A review session with the labels as the reviewer: what a person working the queue would meet.

After an open-set run has ingested a labelled folder, the queue is worked through the API exactly as the
page does it, oldest first, one decision at a time. For each detection the "right individual" is one
whose placed detections are mostly of the detection's own animal; the figures are how often such an
individual exists, how often the page's suggestions held it (first, or among the top 3), and how many
actions each decision took (a click or key press to confirm a suggestion or declare a new animal; typing
an id and pressing a key to assign one that was not suggested).
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Callable

import httpx

SUGGESTIONS = 3


def right_individuals(identity: str, placements: dict[int, Counter]) -> set[int]:
    """Individuals whose placed detections are mostly of `identity` (ties count)."""
    out = set()
    for individual, counts in placements.items():
        if counts and counts[identity] and counts[identity] == max(counts.values()):
            out.add(individual)
    return out


def judge(candidates: list[int], right: set[int], k: int = SUGGESTIONS) -> tuple[int | None, str, int]:
    """(rank of the first right suggestion within the top k or None, the action, actions it takes)."""
    for rank, individual in enumerate(candidates[:k], 1):
        if individual in right:
            return rank, "confirm", 1
    if right:
        return None, "assign", 2  # type the id, press Assign
    return None, "new", 1


def summarize(outcomes: list[dict]) -> dict:
    known = [o for o in outcomes if o["right_exists"]]
    hits = [o["rank"] for o in known]
    n = len(known)
    return {
        "decisions": len(outcomes),
        "right_individual_existed": n,
        "right_individual_was_new": len(outcomes) - n,
        "top1_of_existing": round(sum(1 for r in hits if r == 1) / n, 4) if n else None,
        "top3_of_existing": round(sum(1 for r in hits if r is not None) / n, 4) if n else None,
        "actions": dict(Counter(o["action"] for o in outcomes)),
        "mean_actions_per_decision": round(sum(o["clicks"] for o in outcomes) / len(outcomes), 3) if outcomes else None,
        "fusion_had_no_candidate": sum(1 for o in outcomes if not o["candidates"]),
    }


async def work_queue(api_url: str, headers: dict, prop: str, truth: dict[str, str], placed: dict[str, int | None],
                     max_decisions: int = 10000, observe: Callable[[int, dict], None] | None = None) -> dict:
    """Work the property's review queue to the end; `placed` is each detection's individual before (changed here).
    `observe(decisions so far, placed)` is called after every decision (the census eval's curve of today's way)."""
    placements: dict[int, Counter] = {}
    for det, ind in placed.items():
        if ind is not None and det in truth:
            placements.setdefault(ind, Counter())[truth[det]] += 1
    outcomes: list[dict] = []
    seconds: list[float] = []
    async with httpx.AsyncClient(base_url=api_url, timeout=60, headers=headers) as client:
        while len(outcomes) < max_decisions:
            queue = (await client.get("/v1/review", params={"property": prop, "limit": 1, "order": "oldest"})).json()
            if not queue["items"]:
                break
            item = queue["items"][0]
            det = item["detection"]
            identity = truth.get(det)
            if identity is None:
                raise RuntimeError(f"detection {det} in the queue is not one this run uploaded")
            previous = placed.get(det)
            if previous is not None:  # a flagged placement: judge it as if it were not placed yet
                placements[previous][identity] -= 1
            candidates = [c["individual_id"] for c in item["candidates"]]
            right = right_individuals(identity, placements)
            rank, action, clicks = judge(candidates, right)
            body = {"action": action, "reason": "review session (labels as the reviewer)"}
            if action == "confirm":
                body["individual_id"] = candidates[rank - 1]
            elif action == "assign":
                body["individual_id"] = max(right, key=lambda i: placements[i][identity])
            started = time.monotonic()
            r = await client.post(f"/v1/detections/{det}/decision", json=body)
            seconds.append(time.monotonic() - started)
            if r.status_code != 200:
                raise RuntimeError(f"decision on {det} refused: {r.status_code} {r.text[:300]}")
            change = r.json()
            target = change["after"]["detections"][det]["individual_id"]
            placements.setdefault(target, Counter())[identity] += 1
            placed[det] = target
            outcomes.append({"detection": det, "right_exists": bool(right), "rank": rank, "action": action,
                             "clicks": clicks, "candidates": candidates[:SUGGESTIONS]})
            if observe is not None:
                observe(len(outcomes), placed)
    report = summarize(outcomes)
    report["api_seconds_per_decision"] = round(sum(seconds) / len(seconds), 4) if seconds else None
    return report
