"""`deer-reid eval DATA --protocol keypoints`: a pattern matcher's keypoint-budget curve, accuracy beside cost.

For each budget (`--budgets 700:0.04,3000:0.01`: keypoints kept, and for RootSIFT SIFT's contrast threshold,
which decides how many it finds on the animal at all), every photo's pattern is extracted as the coat service
extracts it (the service's foreground, restricted to the animal per DEER_COAT_RESTRICT_TO_ANIMAL), and each
photo's pattern re-ranks its `shortlist` closest photos of other encounters by the fast body model (the
candidates fusion gives coat matching), pattern alone, ties kept in the body's order. Reported per budget:
keypoints found per photo, top-1 and top-5 (95% intervals resampling whole identities), extraction
milliseconds per photo, matching milliseconds per pair (stored patterns, as fusion matches them), and the
milliseconds one detection costs (extraction + a shortlist of matches), all on one core, with the CPU model.

The curve is drawn on the fit half of the identities by default (`--half fit`): a budget is chosen there, and
`eval --protocol loo --coat` reports the chosen one on the held-out half, so no figure it reports chose it.
"""
from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

from deer_reid.bench.bare import cpu_model
from deer_reid.evaluation.calibration import split_identities
from deer_reid.evaluation.coat import closest
from deer_reid.evaluation.dataset import load_dataset
from deer_reid.evaluation.features import embed_samples, pipeline_crop
from deer_reid.evaluation.metrics import bootstrap_interval
from deer_reid.evaluation.run import reindexed, select
from services.coat.foreground import foreground
from services.coat.pattern import SIFT_DEFAULT_CONTRAST, PatternExtractor
from shared.coat import MIN_MATCHES, Pattern, inliers, pack, unpack
from shared.config import Settings


def parse_budgets(text: str) -> list[tuple[int, float]]:
    """"700:0.04,3000:0.01" -> [(700, 0.04), (3000, 0.01)]; a budget without a contrast takes OpenCV's."""
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        keypoints, _, contrast = part.partition(":")
        try:
            budget = (int(keypoints), float(contrast) if contrast else SIFT_DEFAULT_CONTRAST)
        except ValueError:
            raise ValueError(f"--budgets: {part!r} is not KEYPOINTS[:CONTRAST]") from None
        if budget[0] < MIN_MATCHES or not 0 < budget[1] <= 0.2:
            raise ValueError(f"--budgets: {part!r} keeps under {MIN_MATCHES} keypoints or its contrast is not in "
                             "(0, 0.2]")
        out.append(budget)
    if not out:
        raise ValueError("--budgets names no budget")
    return out


def _extract(args: tuple[bytes, str, bool, list[tuple[int, float]]]) -> tuple[list[bytes | None], list[float]]:
    """One crop's pattern at every budget (the animal found once), packed as the service stores it (int8
    descriptors: matching sees what fusion sees), and each extraction's milliseconds."""
    crop, matcher, restrict, budgets = args
    rgb = np.array(Image.open(io.BytesIO(crop)).convert("RGB"))
    started = time.perf_counter()
    fg = foreground(rgb) if restrict else None
    found_ms = 1000 * (time.perf_counter() - started)
    patterns, timings = [], []
    for keypoints, contrast in budgets:
        t = time.perf_counter()
        if fg is not None and not fg.found:
            patterns.append(None)
        else:
            pattern = PatternExtractor(matcher, keypoints, contrast)(rgb, fg.mask if fg is not None else None)
            patterns.append(pack(pattern) if len(pattern) >= MIN_MATCHES else None)
        timings.append(found_ms + 1000 * (time.perf_counter() - t))
    return patterns, timings


def rerank_by_pattern(patterns: Sequence[Pattern | None], candidates: Sequence[np.ndarray]
                      ) -> tuple[list[np.ndarray], float]:
    """Each query's candidates re-ranked by verified matches (pattern alone; ties and photos without a
    pattern keep the body's order), and the matching milliseconds per pair. Queries without a pattern keep
    the body's order."""
    ranked, spent, pairs = [], 0.0, 0
    for q, cand in enumerate(candidates):
        if patterns[q] is None:
            ranked.append(cand)
            continue
        t = time.perf_counter()
        score = np.array([inliers(patterns[q], patterns[j]) if patterns[j] is not None else -1 for j in cand])
        spent += time.perf_counter() - t
        pairs += sum(patterns[j] is not None for j in cand)
        ranked.append(cand[np.lexsort((np.arange(len(cand)), -score))])
    return ranked, 1000 * spent / max(pairs, 1)


def hits(ranked: Sequence[np.ndarray], identities: Sequence, queries: Sequence[int], top: int) -> np.ndarray:
    """Per query: whether its animal is among the first `top` of its ranked candidates."""
    ids = np.asarray(identities)
    return np.array([bool((ids[ranked[q][:top]] == ids[q]).any()) for q in queries])


def _budget_row(extracted: list, b: int, budget: tuple[int, float], candidates: list[np.ndarray], ids: list,
                queries: list[int], shortlist: int) -> dict:
    """One budget's row of the curve: its patterns re-rank every query's candidates, timed on one core."""
    keypoints, contrast = budget
    qids = [ids[q] for q in queries]
    patterns = [unpack(e[0][b]) if e[0][b] is not None else None for e in extracted]
    with threadpool_limits(1):  # the matching milliseconds are one core's, as fusion's executor thread's
        ranked, per_pair = rerank_by_pattern(patterns, candidates)
    top1, top5 = (hits(ranked, ids, queries, k) for k in (1, 5))
    extract_ms = float(np.mean([e[1][b] for e in extracted]))
    return {"keypoints": keypoints, "contrast": contrast,
            "found_per_photo": round(float(np.mean([len(p) if p is not None else 0 for p in patterns])), 1),
            "without_pattern": sum(p is None for p in patterns),
            "top1": round(float(top1.mean()), 4), "top5": round(float(top5.mean()), 4),
            "top1_ci95": bootstrap_interval(top1, qids), "top5_ci95": bootstrap_interval(top5, qids),
            "extract_ms": round(extract_ms, 2), "match_ms_per_pair": round(per_pair, 3),
            "ms_per_detection": round(extract_ms + shortlist * per_pair, 1)}


def run_keypoints(data: Path, *, budgets: list[tuple[int, float]], matcher: str, half: str, shortlist: int,
                  limit: int | None, seed: int, settings: Settings, report_dir: Path | None,
                  json_path: str | None, progress: bool = True) -> dict:
    load_average = [round(x, 2) for x in os.getloadavg()]  # the milliseconds are at the mercy of other work
    samples = select(load_dataset(data), limit, seed)
    fit, held = split_identities([s.identity for s in samples], seed)
    chosen = fit if half == "fit" else held
    samples = reindexed([s for s in samples if s.identity in chosen])
    ids, encounters = [s.identity for s in samples], [s.encounter for s in samples]
    has_positive = [any(ids[j] == ids[q] and encounters[j] != encounters[q] for j in range(len(samples)))
                    for q in range(len(samples))]
    body = embed_samples(samples, [settings.body_model], settings, progress=progress)[0][settings.body_model]
    candidates = closest(body @ body.T, encounters, shortlist)
    work = [(pipeline_crop(s.path.read_bytes(), settings), matcher, settings.coat_restrict_to_animal, budgets)
            for s in samples]
    workers = max(1, min(len(work) // 8, len(os.sched_getaffinity(0))))
    with ProcessPoolExecutor(workers) as pool:
        extracted = list(pool.map(_extract, work, chunksize=4))
    queries = [q for q in range(len(samples)) if has_positive[q]]
    curve = [_budget_row(extracted, b, budget, candidates, ids, queries, shortlist) for b, budget in enumerate(budgets)]
    body_top1 = hits(candidates, ids, queries, 1)
    result = {"protocol": "keypoints", "data": str(data), "matcher": matcher, "half": half, "seed": seed,
              "images": len(samples), "true_individuals": len(set(ids)), "queries": len(queries),
              "shortlist": shortlist, "restrict_to_animal": settings.coat_restrict_to_animal,
              "body_model": settings.body_model, "body_order_top1": round(float(body_top1.mean()), 4),
              "cpu_model": cpu_model(), "load_average": load_average, "curve": curve}
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "report.md").write_text(markdown(result))
    return result


def markdown(result: dict) -> str:
    lines = [f"# deer-reid evaluation: keypoint budgets of {result['matcher']}", "",
             f"- data: `{result['data']}`, the {result['half']} half of its identities (seed {result['seed']}): "
             f"{result['images']} images, {result['true_individuals']} individuals, {result['queries']} queries",
             f"- each query's {result['shortlist']} closest photos by {result['body_model']} (its order: top-1 "
             f"{result['body_order_top1']:.3f}), re-ranked by the pattern alone; on the animal only: "
             f"{result['restrict_to_animal']}",
             f"- CPU: {result['cpu_model']} (milliseconds on one core; load average at the start "
             f"{result['load_average']})", "",
             "| keypoints | contrast | found per photo | top-1 [95%] | top-5 [95%] | extract ms | ms a pair "
             "| ms a detection |", "|---|---|---|---|---|---|---|---|"]
    for c in result["curve"]:
        lines.append(f"| {c['keypoints']} | {c['contrast']:g} | {c['found_per_photo']:.0f} | {c['top1']:.3f} "
                     f"{c['top1_ci95']} | {c['top5']:.3f} {c['top5_ci95']} | {c['extract_ms']:.1f} "
                     f"| {c['match_ms_per_pair']:.2f} | {c['ms_per_detection']:.0f} |")
    return "\n".join(lines) + "\n"
