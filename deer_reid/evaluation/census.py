"""`deer-reid eval DATA --protocol census`: the census with people in the loop, measured on labelled photos.

1. The photos are uploaded one at a time into a fresh property of the running stack, sighting by sighting
   (an encounter's frames together, the encounters in a seeded order), and fusion decides each online, as
   it does today. The online decisions are scored.
2. The census service re-clusters the property's identity graph, with no answer yet. Scored.
3. The labels answer the system's own questions, one at a time, best first, as a reviewer would, wrong with
   probability `reviewer_error` (seeded); every `recluster_every` answers the graph is re-solved (and the
   property's calibration refitted from the answers once there are enough). Scored after each re-solve,
   up to `budget` answers or until nothing is left to ask.
4. Today's way on the same photos: byte-different copies of them (a JPEG comment added, the pixels
   unchanged, so that the stack does not take them for duplicates) go into a second fresh property, and
   its review queue is worked oldest first with the top 3 candidates (`review_session`), the same
   budget, scored after every `recluster_every` decisions.

Every figure comes from the stack's own database: which individual each uploaded detection is in.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np

from deer_reid.census import recluster
from deer_reid.evaluation.dataset import Sample
from deer_reid.evaluation.metrics import answers_floor, clustering_report
from deer_reid.evaluation.report import plot_census, write_report
from shared.config import Settings

FALLBACK_TIME = "2025-11-01T06:00:00Z"
COPY_MARK = b"deer-reid census eval: today's way, a copy"


def sighting_order(samples: list[Sample], seed: int) -> list[int]:
    """Indexes in upload order: encounters in a seeded order, each encounter's frames together."""
    by_encounter: dict = defaultdict(list)
    for i, s in enumerate(samples):
        by_encounter[(s.identity, s.encounter)].append(i)
    keys = sorted(by_encounter, key=str)
    return [i for k in np.random.default_rng(seed).permutation(len(keys)) for i in by_encounter[keys[int(k)]]]


def with_comment(jpeg: bytes, text: bytes) -> bytes:
    """The same JPEG with a comment segment after its start marker: other bytes, the same pixels."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    return jpeg[:2] + b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text + jpeg[2:]


def point(answers: int, placed: dict[str, int | None], truth: dict[str, str], **extra) -> dict:
    ids = sorted(truth)
    report = clustering_report([placed.get(i) for i in ids], [truth[i] for i in ids])
    return {"answers": answers, **{k: round(report[k], 4) for k in ("bcubed_f1", "bcubed_precision", "bcubed_recall",
                                                                     "false_merge_rate", "false_split_rate",
                                                                     "review_rate")},
            "predicted_individuals": report["predicted_individuals"], **extra}


def placements(client: httpx.Client, ids: list[str]) -> dict[str, int | None]:
    """Each detection's individual now (None: in review or not placed)."""
    out: dict[str, int | None] = {}
    for start in range(0, len(ids), 5000):
        r = client.post("/v1/detections/states", json={"ids": ids[start:start + 5000]})
        r.raise_for_status()
        body = r.json()
        out.update({d: (body["individuals"][d] if body["states"][d] in ("assigned", "new") else None)
                    for d in body["states"]})
    return out


def answers_to(curve: list[dict], f1: float) -> int | None:
    return next((p["answers"] for p in curve if p["bcubed_f1"] >= f1), None)


def floor_of_answers(identities: list[str], sightings: list) -> dict:
    """`answers_floor` for F1 0.90 and 0.95, and the latter per sighting: what the answers could reach at best
    if the machine joined nothing (a target needing more than the budget per sighting is out of reach of any
    question policy, and only stronger machine evidence brings it closer)."""
    at = answers_floor(identities, sightings, (0.90, 0.95))
    count = len(set(zip(identities, sightings)))
    return {"f1_90": at[0.90], "f1_95": at[0.95],
            "per_sighting_f1_95": None if at[0.95] is None else round(at[0.95] / count, 3)}


def ask_and_answer(client: httpx.Client, prop: str, truth: dict[str, str], *, budget: int, reviewer_error: float,
                   recluster_every: int, seed: int, progress: bool) -> tuple[list[dict], dict]:
    """Answer the property's questions with the labels; the curve after every re-solve, and the tallies."""
    rng = np.random.default_rng(seed)
    ids = sorted(truth)
    run = recluster(client, prop)
    curve = [point(0, placements(client, ids), truth, run_id=run["id"], questions_left=run["summary"].get(
        "questions_left"))]
    tally = {"answers": 0, "wrong_answers": 0, "refused": 0, "skipped_unknown": 0, "runs": 1, "refits": []}
    since = 0
    started = time.monotonic()
    while tally["answers"] < budget:
        q = client.get(f"/v1/census/{prop}/questions/next").json()["question"]
        if q is None:
            if since == 0:
                break  # re-solved with every answer so far, and nothing is left to ask
            q = _resolve(client, prop, truth, curve, tally)
            since = 0
            if q is None:
                break
        a, b = q["a"]["detection"], q["b"]["detection"]
        if a not in truth or b not in truth:
            raise RuntimeError(f"question {q['id']} is about a detection this run did not upload")
        same = truth[a] == truth[b]
        if rng.random() < reviewer_error:
            same = not same
            tally["wrong_answers"] += 1
        r = client.post(f"/v1/census/questions/{q['id']}/answer",
                        json={"answer": "same" if same else "different", "reason": "census eval (labels as reviewer)"})
        if r.status_code == 409:
            # the answer contradicts earlier ones (a wrong answer before, or this one): a person told so
            # reconsiders; here the question is skipped
            tally["refused"] += 1
            client.post(f"/v1/census/questions/{q['id']}/answer", json={"answer": "skip"})
            continue
        r.raise_for_status()
        tally["answers"] += 1
        since += 1
        if progress and tally["answers"] % 50 == 0:
            print(f"census: {tally['answers']} answers, {time.monotonic() - started:.0f} s", flush=True)
        if since >= recluster_every:
            _resolve(client, prop, truth, curve, tally)
            since = 0
    if since:
        _resolve(client, prop, truth, curve, tally)
    return curve, tally


def _resolve(client: httpx.Client, prop: str, truth: dict[str, str], curve: list[dict], tally: dict) -> dict | None:
    """Re-solve with the answers so far, score it, and return the next question."""
    run = recluster(client, prop)
    tally["runs"] += 1
    summary = run["summary"] or {}
    if (summary.get("refit") or {}).get("calibration_id"):
        tally["refits"].append({"answers": tally["answers"], **{k: summary["refit"][k] for k in
                                                                ("calibration_id", "before", "after", "why")}})
    curve.append(point(tally["answers"], placements(client, sorted(truth)), truth, run_id=run["id"],
                       questions_left=summary.get("questions_left")))
    return client.get(f"/v1/census/{prop}/questions/next").json()["question"]


def today_curve(api_url: str, headers: dict, prop: str, truth: dict[str, str], placed: dict[str, int | None],
                budget: int, every: int) -> tuple[list[dict], dict]:
    """The review queue worked oldest first with the top 3 (today's way), scored every `every` decisions."""
    from deer_reid.evaluation.review_session import work_queue

    curve = [point(0, dict(placed), truth)]

    def observe(decisions: int, now: dict[str, int | None]) -> None:
        if decisions % every == 0:
            curve.append(point(decisions, now, truth))

    session = asyncio.run(work_queue(api_url, headers, prop, truth, placed, max_decisions=budget, observe=observe))
    if curve[-1]["answers"] != session["decisions"]:
        curve.append(point(session["decisions"], placed, truth))
    return curve, session


def run_census(data: Path, *, mode: str, body_model: str | None, limit: int | None, seed: int, api_url: str,
               report_dir: Path | None, json_path: Path | None, budget: int, reviewer_error: float,
               recluster_every: int, baseline: bool = True, progress: bool = True, settings: Settings | None = None,
               stack_models: list[str] = ()) -> dict:
    from deer_reid.client import auth_headers, switch_pipeline
    from deer_reid.evaluation.run import _base, _open_set, stack_photos

    settings = settings or Settings()
    headers = auth_headers(settings)
    samples, held_out = stack_photos(data, body_model, stack_models, limit, seed, api_url, headers, settings)
    order = sighting_order(samples, seed)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    prop, today = f"census-{stamp}-s{seed}", f"census-{stamp}-s{seed}-today"
    for site in (prop, today) if baseline else (prop,):
        httpx.put(f"{api_url}/v1/sites/{site}", json={"property": site}, timeout=30, headers=headers).raise_for_status()
        # the census runs when this eval asks, never on its own: the online decisions are measured as they are
        httpx.put(f"{api_url}/v1/census/{site}", json={"auto": False}, timeout=30, headers=headers).raise_for_status()
    has_time = all(s.captured_at for s in samples)
    before = switch_pipeline(api_url, headers, mode=mode, temporal=has_time)
    started = time.monotonic()
    try:
        dets = asyncio.run(_open_set(api_url, samples, order, prop, FALLBACK_TIME, progress, True, headers))
        copies = asyncio.run(_open_set(api_url, samples, order, today, FALLBACK_TIME, progress, True, headers,
                                       copy_mark=COPY_MARK)) if baseline else None
    finally:
        switch_pipeline(api_url, headers, **before)
    upload_s = time.monotonic() - started
    truth = {d["id"]: s.identity for d, s in zip(dets, samples)}
    online = {d["id"]: d.get("individual_id") if d.get("state") in ("assigned", "new") else None for d in dets}
    result = _base("census", mode, data, samples, seed)
    result.update({"property": prop, "held_out": held_out,
                   "sightings": len({(s.identity, s.encounter) for s in samples}),
                   "upload_s": round(upload_s, 1), "budget": budget, "reviewer_error": reviewer_error,
                   "recluster_every": recluster_every, "online": point(0, online, truth)})
    result["answers_floor"] = floor_of_answers([s.identity for s in samples], [s.encounter for s in samples])
    with httpx.Client(base_url=api_url, headers=headers, timeout=120) as client:
        started = time.monotonic()
        curve, tally = ask_and_answer(client, prop, truth, budget=budget, reviewer_error=reviewer_error,
                                      recluster_every=recluster_every, seed=seed, progress=progress)
        result["census_s"] = round(time.monotonic() - started, 1)
        result["census_now"] = client.get(f"/v1/census/{prop}").json()
    result.update({"curve": curve, "tally": tally, "reclustered_before_answers": curve[0],
                   "answers_to_f1_90": answers_to(curve, 0.90), "answers_to_f1_95": answers_to(curve, 0.95),
                   "answers_per_sighting_to_f1_95": None if answers_to(curve, 0.95) is None
                   else round(answers_to(curve, 0.95) / result["sightings"], 3)})
    if copies is not None:
        copy_truth = {d["id"]: s.identity for d, s in zip(copies, samples)}
        copy_placed = {d["id"]: d.get("individual_id") if d.get("state") in ("assigned", "new") else None
                       for d in copies}
        base_curve, session = today_curve(api_url, headers, today, copy_truth, copy_placed, budget, recluster_every)
        result["baseline"] = {"property": today, "how": "review queue, oldest first, top 3 candidates (eval --review)",
                              "online": point(0, {d["id"]: d.get("individual_id") if d.get("state") in
                                                  ("assigned", "new") else None for d in copies}, copy_truth),
                              "curve": base_curve, "session": session,
                              "answers_to_f1_90": answers_to(base_curve, 0.90),
                              "answers_to_f1_95": answers_to(base_curve, 0.95)}
    result["true_individuals"] = len(set(truth.values()))
    results = [d.get("result") or {} for d in dets]
    versions = next((r["versions"] for r in results if r.get("versions")), {})
    result.update({"body_models": list(versions), "embedding_versions": versions,
                   "weights_real": not any(r.get("random_weights", True) for r in results if r)})
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        result["plots"] = {"census": str(plot_census(result, Path(report_dir) / "census.png"))}
    write_report(result, report_dir, json_path)
    return result
