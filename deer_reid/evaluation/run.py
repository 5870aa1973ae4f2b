"""`deer-reid eval`: the loo and open-set protocols, end to end.

The loo protocol runs in stages, each in a module of its own: the components scored (`loo_components`), the
fusion fitted and the ablation measured (`loo_fit`), the JSON, artifact and plots written (`loo_report`).
"""
from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from deer_reid.evaluation.antler import males
from deer_reid.evaluation.calibration import fused_similarity
from deer_reid.evaluation.dataset import Sample, check_queryable, identities_in_seeded_order, load_dataset
from deer_reid.evaluation.loo_components import Photos, embed, score_components, split_by_identity
from deer_reid.evaluation.loo_fit import Fitter, ablate, all_identity_figures, fit
from deer_reid.evaluation.loo_report import report
from deer_reid.evaluation.metrics import clustering_report
from deer_reid.evaluation.report import write_report
from shared.config import Settings
from shared.models import read_card

log = logging.getLogger(__name__)

TEMPORAL_OFF = ("Temporal priors were switched off for this run: the data has no capture times or places, and "
                "the fallback time every upload needs would be an invented habit. Their effect on accuracy cannot "
                "be measured on such data.")


def reindexed(samples: list[Sample]) -> list[Sample]:
    """A subset of samples numbered 0..n-1 again (indices address the similarity matrices)."""
    return [Sample(**{**s.__dict__, "index": n}) for n, s in enumerate(samples)]


def select(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """Whole identities in a seeded order until `limit` images (all of them without a limit)."""
    if not limit or limit >= len(samples):
        return samples
    chosen: list[Sample] = []
    for photos in identities_in_seeded_order(samples, seed).values():
        chosen.extend(photos)
        if len(chosen) >= limit:
            break
    return reindexed(chosen[:limit])


def _model_names(mode: str, body_model: str | None, settings: Settings) -> list[str]:
    default = settings.body_model if mode == "fast" else (settings.body_ensemble or settings.body_model)
    names = [n.strip() for n in (body_model or default).split(",") if n.strip()]
    if mode == "fast" and len(names) > 1:
        raise ValueError("fast mode runs one body model; give one name, or --mode enhanced")
    return names


def _base(protocol: str, mode: str, data: Path, samples: list[Sample], seed: int) -> dict:
    return {"protocol": protocol, "mode": mode, "data": str(data), "images": len(samples),
            "true_individuals": len({s.identity for s in samples}), "seed": seed}


def never_trained_on(samples: list[Sample], model_names: list[str], settings: Settings,
                     holdout_of: str | None = None) -> tuple[list[Sample], dict]:
    """The samples a fair measurement may use: never the identities a trained model learned or was
    selected on; with `holdout_of`, only that trained model's holdout identities (so that an ImageNet
    model and a fine-tuned one are measured on the same animals)."""
    excluded: set[str] = set()
    notes = {}
    for name in model_names:
        card = read_card(name, settings.model_cache)
        if card:
            learned = set(card["identities"]["train"]) | set(card["identities"]["validation"])
            excluded |= learned
            notes[name] = f"{len(learned)} identities it was trained or selected on are left out"
    keep = None
    if holdout_of:
        card = read_card(holdout_of, settings.model_cache)
        if card is None:
            raise ValueError(f"--holdout-of {holdout_of}: no trained model of that name in {settings.model_cache}")
        keep = set(card["identities"]["holdout"])
        notes["holdout_of"] = f"only the {len(keep)} identities {holdout_of} held out"
    kept = [s for s in samples if s.identity not in excluded and (keep is None or s.identity in keep)]
    if len({s.identity for s in kept}) < 2:
        raise ValueError("fewer than 2 identities are left that no model here was trained on")
    return reindexed(kept), notes


class ChosenPhotos(NamedTuple):
    """The photos a loo run measures on, and what choosing them found."""
    photos: Photos
    fairness: dict  # never_trained_on's notes: which identities were left out, and why
    few_queries: str | None  # check_queryable's warning
    male_notes: dict  # with --antler: the males kept
    viewpoint_card: dict | None  # the viewpoint classifier to measure (where the data has viewpoints) or use


def choose_loo_photos(data: Path, names: list[str], settings: Settings, *, limit: int | None, seed: int,
                      holdout_of: str | None, antler: bool, pose: bool, viewpoint_model: str) -> ChosenPhotos:
    """The labelled photos no model of the run learned: whole identities up to `limit`, the males only with
    `antler` (a male feature, so every component is measured on them alike). Refuses a run with no query at
    all, or --pose without a classifier, before any embedding."""
    samples = load_dataset(data)
    # The pose service's viewpoint classifier: measured wherever the data has viewpoints (on the identities it
    # never learned), and compared on with --pose (then every identity it learned is left out of the run).
    viewpoint_card = read_card(viewpoint_model, settings.model_cache) if pose or any(s.viewpoint for s in samples) \
        else None
    if pose and viewpoint_card is None:
        raise ValueError(f"--pose: no viewpoint classifier {viewpoint_model!r} in {settings.model_cache}; "
                         "train one with `deer-reid train viewpoint DATA_DIR`")
    samples, fairness = never_trained_on(samples, names + ([viewpoint_model] if pose else []), settings, holdout_of)
    samples = select(samples, limit, seed)
    male_notes: dict = {}
    if antler:
        male_samples, male_notes = males(data, samples)
        samples = reindexed(male_samples)
    few_queries = check_queryable(samples)
    if few_queries:
        log.warning("eval: %s", few_queries)
    return ChosenPhotos(Photos.of(samples), fairness, few_queries, male_notes, viewpoint_card)


def run_loo(data: Path, *, mode: str, body_model: str | None, limit: int | None, seed: int, report_dir: Path | None,
            json_path: Path | None, target_false_merge: float, calibration_out: Path | None,
            settings: Settings, allow_random: bool = False, progress: bool = True,
            holdout_of: str | None = None, max_review: float | None = None, coat: bool = False,
            coat_shortlist: int | None = None, antler: bool = False,
            antler_ignore_cut: bool = False, pose: bool = False, viewpoint_model: str | None = None) -> dict:
    """Closed-set retrieval, the ablation, and the fitted fusion (written as the calibration artifact).

    Identities are split in two (seeded): the fusion (per-component calibrations, weights, the
    identity-level aggregation, thresholds) is fitted on one half; every figure that depends on the
    fit (fused retrieval, the ablation, the open-set outcome) is reported on the other half only.
    """
    names = _model_names(mode, body_model, settings)
    viewpoint_model = viewpoint_model or settings.pose_viewpoint_model
    chosen = choose_loo_photos(data, names, settings, limit=limit, seed=seed, holdout_of=holdout_of, antler=antler,
                               pose=pose, viewpoint_model=viewpoint_model)
    photos = chosen.photos
    body = embed(photos, names, settings, allow_random=allow_random, progress=progress)
    split = split_by_identity(photos, seed)
    components = score_components(photos, split, body, settings, coat=coat, coat_shortlist=coat_shortlist,
                                  antler=antler, antler_ignore_cut=antler_ignore_cut, male_notes=chosen.male_notes,
                                  pose=pose, viewpoint_classifier=viewpoint_model,
                                  viewpoint_card=chosen.viewpoint_card, progress=progress)
    # nothing fitted: the SPEC's weighted mean of the raw scores, on every identity of the run
    unfitted = fused_similarity(components.whole_run, None, settings.weights())
    all_identities = all_identity_figures(photos, body, unfitted)
    fitter = Fitter.on(components, photos, split, body, settings, seed=seed, target_false_merge=target_false_merge,
                       max_review=max_review)
    fitted = fit(fitter, unfitted, settings.identity_aggregation)
    ablation = ablate(components, fitter, fitted, unfitted, body)
    header = {**_base("loo", mode, data, photos.samples, seed),
              **({"warnings": [chosen.few_queries]} if chosen.few_queries else {}),
              "never_trained_on": chosen.fairness}
    return report(header, body, components, all_identities, fitter, fitted, ablation,
                  artifact_path=calibration_out or settings.calibration_path, report_dir=report_dir,
                  json_path=json_path)


async def _open_set(api_url: str, samples: list[Sample], order: list[int], site: str, fallback_time: str,
                    progress: bool, sightings: bool = False, headers: dict | None = None,
                    copy_mark: bytes | None = None) -> list[dict]:
    """Upload the samples one at a time in `order`, each waited for until decided; the detections as the API
    shows them. With `copy_mark`, byte-different copies are uploaded (a JPEG comment; the same pixels)."""
    import httpx

    from deer_reid.evaluation.census import with_comment

    from shared.states import TERMINAL

    out: list[dict] = [{} for _ in samples]
    async with httpx.AsyncClient(base_url=api_url, timeout=60, headers=headers) as client:
        for i in tqdm(order, desc="open-set", unit="img", disable=not progress):
            s = samples[i]
            fields = {"site": site, "camera": s.camera or "eval", "cls": s.cls.value,
                      "fallback_captured_at": s.captured_at or fallback_time}
            if sightings:
                fields["sighting"] = re.sub(r"[^A-Za-z0-9._:-]", "-", f"enc-{s.encounter}")[:100]
            data = s.path.read_bytes() if copy_mark is None else with_comment(s.path.read_bytes(), copy_mark)
            resp = await client.post("/v1/uploads", data=fields,
                                     files=[("files", (s.path.name, data, "image/jpeg"))])
            if resp.status_code >= 400:
                raise RuntimeError(f"{s.path}: upload refused: {resp.status_code} {resp.text[:300]}")
            image = resp.json()["images"][0]
            if image["duplicate"]:
                raise RuntimeError(f"{s.path} was ingested before: an open-set run needs a stack that has never "
                                   "seen these images (a fresh DEER_HOME)")
            det_id = image["detections"][0]["id"]
            while True:
                det = (await client.get(f"/v1/detections/{det_id}")).json()
                if det["state"] in TERMINAL:
                    break
                await asyncio.sleep(0.02)
            out[i] = det
    return out


def held_out_of(samples: list[Sample], artifact: dict | None) -> tuple[list[Sample], dict]:
    """The samples whose identities the active calibration was not fitted on (all without one).

    The running fusion service decides with the artifact's thresholds, so scoring it on the
    images those thresholds were chosen on would report the fit, not the system.
    """
    fitted = set((artifact or {}).get("fit", {}).get("identity_names", []))
    if not fitted:
        return samples, {"calibration": "none installed" if artifact is None else "no fitted identities",
                         "identities_excluded": 0}
    kept = [s for s in samples if s.identity not in fitted]
    if not kept:
        raise ValueError("every identity of the data was used to fit the active calibration: nothing is left "
                         "to report on")
    return reindexed(kept), {
        "identities_excluded": len({s.identity for s in samples} & fitted), "images_excluded": len(samples) - len(kept)}


def _stack_calibration(api_url: str, headers: dict) -> dict | None:
    import httpx

    resp = httpx.get(f"{api_url}/v1/calibration", timeout=30, headers=headers)
    if resp.status_code == 404:
        return None
    resp.raise_for_status()
    return resp.json()


def stack_photos(data: Path, body_model: str | None, stack_models: list[str], limit: int | None, seed: int,
                 api_url: str, headers: dict, settings: Settings) -> tuple[list[Sample], dict]:
    """The photos a protocol run through the stack uploads: none of an identity that its body models
    (`body_model`, else the running stack's) learned, nor one its active calibration was fitted on; and a
    note of what was left out (the JSON's `held_out`)."""
    installed = _stack_calibration(api_url, headers)
    names = [n.strip() for n in (body_model or ",".join(stack_models)).split(",") if n.strip()]
    fair, fairness = never_trained_on(load_dataset(data), names, settings)
    samples, held_out = held_out_of(select(fair, limit, seed), (installed or {}).get("artifact"))
    held_out.update({"never_trained_on": fairness, "calibration_id": (installed or {}).get("id")})
    return samples, held_out


def run_open_set(data: Path, *, mode: str, body_model: str | None, limit: int | None, seed: int, api_url: str,
                 report_dir: Path | None, json_path: Path | None, progress: bool = True,
                 settings: Settings | None = None, stack_models: list[str] = (), sightings: bool = False,
                 review: bool = False) -> dict:
    """Upload the images one by one to the running stack (in `mode`, switched for the run and restored
    after) and score the individuals it built. Each run uses its own site in its own property, so
    earlier runs' individuals are never candidates."""
    import httpx

    from deer_reid.client import auth_headers, switch_pipeline

    settings = settings or Settings()
    headers = auth_headers(settings)
    samples, held_out = stack_photos(data, body_model, stack_models, limit, seed, api_url, headers, settings)
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(samples))]
    site = f"eval-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-s{seed}"
    httpx.put(f"{api_url}/v1/sites/{site}", json={"property": site}, timeout=30, headers=headers).raise_for_status()
    has_time = all(s.captured_at for s in samples)
    before = switch_pipeline(api_url, headers, mode=mode, temporal=has_time)
    started = time.monotonic()
    try:
        dets = asyncio.run(_open_set(api_url, samples, order, site, "2025-11-01T06:00:00Z", progress, sightings,
                                    headers))
    finally:
        switch_pipeline(api_url, headers, **before)
    wall = time.monotonic() - started
    placed = [d.get("individual_id") if d.get("state") in ("assigned", "new") else None for d in dets]
    ids = [s.identity for s in samples]
    result = _base("open-set", mode, data, samples, seed)
    results = [d.get("result") or {} for d in dets]
    versions = next((r["versions"] for r in results if r.get("versions")), {})
    result.update({
        "site": site, "body_models": list(versions), "embedding_versions": versions, "held_out": held_out,
        "weights_real": not any(r.get("random_weights", True) for r in results if r),
        **clustering_report([placed[i] for i in order], [ids[i] for i in order]),
        "failed": sum(1 for d in dets if d.get("state") == "failed"),
        "states": {s: sum(1 for d in dets if d.get("state") == s) for s in {d.get("state") for d in dets}},
        "thresholds": next((r["thresholds"] for r in results if r.get("thresholds")), None),
        "fusion": next((r["fusion"] for r in results if r.get("fusion")), None),
        "modes_seen": sorted({r.get("mode") for r in results if r}),
        "protocol_detail": "sighting protocol: each encounter uploaded as one sighting" if sightings
        else "image protocol: every image decided on its own",
        "sighting_links": sum(1 for r in results if "sighting" in (r.get("flags") or [])),
        "degraded": sum(1 for r in results if "degraded" in (r.get("flags") or [])),
        "temporal": "on" if has_time else "off",
        "temporal_note": TEMPORAL_OFF if not has_time else "Temporal priors on, from the data's capture times.",
        "wall_s": round(wall, 1), "detections_per_s": round(len(samples) / wall, 2),
    })
    if body_model and set(n.strip() for n in body_model.split(",")) != set(versions):
        result["warning"] = f"--body-model {body_model} differs from the running stack's models {list(versions)}"
    if review:
        # after the open-set figures are taken: the session changes the property's individuals
        from deer_reid.evaluation.review_session import work_queue

        truth = {d["id"]: s.identity for d, s in zip(dets, samples) if d.get("id")}
        placed_now = {d["id"]: d.get("individual_id") if d.get("state") in ("assigned", "new") else None
                      for d in dets if d.get("id")}
        result["review_session"] = asyncio.run(work_queue(api_url, headers, site, truth, placed_now))
    write_report(result, report_dir, json_path)
    return result
