"""`deer-reid eval`: the loo and open-set protocols, end to end."""
from __future__ import annotations

import asyncio
import logging
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deer_reid.evaluation import calibration as cal
from deer_reid.evaluation.dataset import Sample, check_queryable, identities_in_seeded_order, load_dataset
from deer_reid.evaluation.calibration import fused_similarity
from deer_reid.evaluation.antler import WHEN, antler_features, males, notes
from deer_reid.evaluation.coat import (
    coat_features,
    coat_matrices,
    coat_version,
    extraction_ms,
    service_variants,
    shortlists,
)
from deer_reid.evaluation.features import embed_samples
from deer_reid.evaluation.pose import predicted_viewpoints
from deer_reid.evaluation.metrics import clustering_report, query_expanded_similarity, retrieval, \
    retrieval_by_sighting
from deer_reid.evaluation.report import plot_calibrations, plot_cmc, plot_operating_curve, plot_scores, write_report
from shared.components import AGGREGATIONS, body_component, component
from shared.components.antler import ANTLER, Archived
from shared.components.pose import POSE, Seen
from services.fusion.scoring import FusionModel
from shared.config import Settings
from shared.models import read_card
from shared.schemas import sex_of

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


def _facing_agreement(feats: list[dict], samples: list[Sample]) -> dict | None:
    """How often the coat service's facing (from the silhouette) agrees with labelled left/right viewpoints."""
    pairs = [(f["attributes"].get("facing"), s.viewpoint) for f, s in zip(feats, samples)
             if s.viewpoint in ("left", "right") and f["attributes"].get("facing")]
    if not pairs:
        return None
    return {"photos": len(pairs), "agree": round(sum(a == b for a, b in pairs) / len(pairs), 3)}


def all_pairs(name: str, items: list) -> np.ndarray:
    """Component `name`'s (N, N) scores of every photo against every photo (the service scores one query)."""
    return component(name).similarity(items, items)


def _subset(matrix: np.ndarray, idx: list[int]) -> np.ndarray:
    return matrix[np.ix_(idx, idx)]


def _rows(result: dict) -> dict:
    return {m: result[m] for m in ("queries", "top1", "top5", "mAP", "top1_ci95", "top5_ci95") if m in result}


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
    samples = load_dataset(data)
    # The pose service's viewpoint classifier: measured wherever the data has viewpoints (on the identities it
    # never learned), and compared on with --pose (then every identity it learned is left out of the run).
    viewpoint_model = viewpoint_model or settings.pose_viewpoint_model
    viewpoint_card = read_card(viewpoint_model, settings.model_cache) if pose or any(s.viewpoint for s in samples) \
        else None
    if pose and viewpoint_card is None:
        raise ValueError(f"--pose: no viewpoint classifier {viewpoint_model!r} in {settings.model_cache}; "
                         "train one with `deer-reid train viewpoint DATA_DIR`")
    samples, fairness = never_trained_on(samples, names + ([viewpoint_model] if pose else []), settings, holdout_of)
    samples = select(samples, limit, seed)
    antler_notes: dict = {}
    if antler:
        # Antlers are a male feature: the run is restricted to the males, for every component alike.
        male_samples, antler_notes = males(data, samples)
        samples = reindexed(male_samples)
    few_queries = check_queryable(samples)  # refuses a run with no query at all, before any embedding
    if few_queries:
        log.warning("eval: %s", few_queries)
    embeddings, models = embed_samples(samples, names, settings, allow_random=allow_random, progress=progress)
    ids = [s.identity for s in samples]
    enc = [s.encounter for s in samples]
    sexes = [sex_of(s.cls) for s in samples]
    views = [s.viewpoint for s in samples] if all(s.viewpoint for s in samples) else None
    spec_weights = settings.weights()
    # The components, scored by fusion's own scorers, every photo against every photo: one per body network.
    per_component = {body_component(n): all_pairs(body_component(n), list(embeddings[n])) for n in names}
    exemplar_vectors = embeddings[names[0]]
    pattern_variants: dict[str, np.ndarray] = {}
    coat_notes: dict = {}
    if coat:
        # The coat service's extractor on every photo; pattern matching against each photo's body shortlist
        # (as fusion draws it: the gallery photos the fast body model finds closest).
        coat_feats = coat_features(samples, settings, progress=progress)
        coat_started = time.monotonic()
        coat_service = service_variants(settings)
        coat_shortlist = coat_shortlist or settings.coat_shortlist
        coat_body = per_component[body_component(names[0])]

        def coat_shortlists(galleries=None):
            return shortlists(coat_body, enc, coat_shortlist, galleries)
        # over the whole run only the service's patterns are needed (the all-identity rows); the variants
        # are measured in the ablation, on the halves below
        components, _, matched = coat_matrices(coat_feats, coat_shortlists(), coat_service, variants=())
        per_component.update(components)
        coat_notes = {"shortlist": coat_shortlist,
                      "pattern_components": coat_service, "extraction_ms_median": extraction_ms(coat_feats),
                      "matching_s_all_variants": round(time.monotonic() - coat_started, 1),
                      "flags": {f: sum(f in x["flags"] for x in coat_feats)
                                for f in sorted({f for x in coat_feats for f in x["flags"]})},
                      "facing_vs_viewpoint": _facing_agreement(coat_feats, samples)}
    antler_version = None
    if antler:
        antler_feats, antler_version = antler_features(samples, settings, progress=progress)
        # the service's rule: a rack running into the photo's top edge gives no fingerprint; nyala's photos are
        # crops of the animal, so `--antler-ignore-cut` measures the fingerprint as if boxes lay inside the frame
        def antler_pairs(key: str) -> np.ndarray:
            return all_pairs(ANTLER, [Archived(WHEN.isoformat(), None, f[key] is not None, antler_version, f[key], WHEN)
                                      for f in antler_feats])
        per_component[ANTLER] = antler_pairs("fingerprint_uncut" if antler_ignore_cut else "fingerprint")
        antler_notes["cut_by_frame_rule"] = "off" if antler_ignore_cut else "on"
        pattern_variants["antler: full region embedding, no projection"] = antler_pairs("full")
        pattern_variants["antler: fingerprint with the cut-by-frame rule off"] = antler_pairs("fingerprint_uncut")
        antler_notes.update(notes(antler_feats, [s.identity for s in samples], per_component[ANTLER]))
        antler_notes["fingerprint_version"] = antler_version
    pose_notes: dict = {}
    if viewpoint_card is not None:
        learned = set(viewpoint_card["identities"]["train"]) | set(viewpoint_card["identities"]["validation"])
        predicted, pose_notes = predicted_viewpoints(samples, viewpoint_model, settings, learned, progress=progress)
        if pose:
            # as fusion compares: the fast model's similarity, exemplars of the query's own viewpoint only
            per_component[POSE] = all_pairs(POSE, [Seen(v, e) for v, e in zip(predicted, embeddings[names[0]])])
            pose_notes["component"] = ("pose: the body similarity to photos of the same predicted viewpoint "
                                       "(no evidence where either is unknown)")
    unfitted = fused_similarity(per_component, None, spec_weights)
    result = _base("loo", mode, data, samples, seed)
    if few_queries:
        result["warnings"] = [few_queries]
    result.update({
        "never_trained_on": fairness,
        "body_models": names,
        "embedding_versions": {m.spec.name: m.version for m in models},
        "weights_real": not any(m.random_weights for m in models),
        "precision": {m.spec.name: m.precision for m in models},
    })
    if coat:
        result["coat"] = coat_notes
    if antler:
        result["antler"] = antler_notes
    if pose_notes:
        result["viewpoint"] = pose_notes
    main = retrieval(unfitted, ids, enc)
    result.update(_rows(main))
    result["cmc"] = main["cmc"]
    if views:
        result["same_viewpoint"] = _rows(retrieval(unfitted, ids, enc, views))

    # Levers measured on every identity of the run (no fitting involved): the sighting as the query
    # (labelled as such: the figures are per sighting), and αQE re-ranking of a single model.
    result["levers"] = {"sighting as the query (per sighting, not per image)": _rows(
        retrieval_by_sighting(unfitted, ids, enc))}
    if len(names) == 1:
        for k in (1, 2, 3):
            qe = query_expanded_similarity(embeddings[names[0]], enc, k=k)
            result["levers"][f"query expansion αQE k={k}"] = _rows(retrieval(qe, ids, enc))

    fit_ids, held_ids = cal.split_identities(ids, seed)
    fit_idx = [i for i, s in enumerate(samples) if s.identity in fit_ids]
    held_idx = [i for i, s in enumerate(samples) if s.identity in held_ids]
    if coat:
        # From here on each half is a gallery of its own (fitted on, or reported on), and fusion shortlists
        # for coat among the gallery it searches: the shortlists are drawn again within each half, so the
        # reported half's photos are not each given a shortlist that is half spent on the other half.
        started_halves = time.monotonic()
        halves, coat_variants, _ = coat_matrices(coat_feats, coat_shortlists([fit_idx, held_idx]), coat_service,
                                                 matched)
        per_component.update(halves)
        pattern_variants.update(coat_variants)  # beside the antler variants, when both are measured
        coat_notes["matching_s_all_variants"] = round(coat_notes["matching_s_all_variants"]
                                                      + time.monotonic() - started_halves, 1)
        coat_notes["shortlist_drawn"] = "within the whole run for the all-identity rows, within each half after"
    held_order = [int(i) for i in np.random.default_rng(seed + 1).permutation(np.asarray(held_idx))]
    started = time.monotonic()

    def held_out(model, thresholds, aggregation, sightings=None):
        placed = cal.simulate(per_component, held_order, sexes, thresholds, model=model, spec_weights=spec_weights,
                              aggregation=aggregation, exemplar_vectors=exemplar_vectors, sightings=sightings)
        return clustering_report([placed[i] for i in held_order], [ids[i] for i in held_order])

    def fit_thresholds(model, aggregation, scores):
        points = cal.operating_curve(per_component, fit_idx, ids, sexes, seed, cal.threshold_grid(scores),
                                     model=model, spec_weights=spec_weights, aggregation=aggregation,
                                     exemplar_vectors=exemplar_vectors)
        return points, *cal.choose(points, target_false_merge, max_review)

    def fit_fusion(components, how, version_id):
        """Calibrations and weights fitted on the fit half, the model fusion would run, and its scores."""
        fusion = cal.fit_fusion(components, fit_idx, ids, enc, how)
        model = FusionModel.from_artifact({"fusion": fusion, "version_id": version_id})
        return fusion, model, cal.fused_similarity(components, model)

    fit_pairs = _subset(unfitted, fit_idx)[~np.eye(len(fit_idx), dtype=bool)]
    # Before: the SPEC's weighted mean of raw cosines, thresholds fitted the same way.
    _, before, before_met = fit_thresholds(None, settings.identity_aggregation, fit_pairs)
    before_held = held_out(None, cal.Thresholds(match=before.match, new=before.new), settings.identity_aggregation)
    # After: calibrated per component and fused by fitted weights; the aggregation is chosen on the fit half.
    fits = {}
    for how in AGGREGATIONS:
        fusion, model, fused = fit_fusion(per_component, how, f"eval-{how}")
        points, chosen, met = fit_thresholds(model, how, _subset(fused, fit_idx)[~np.eye(len(fit_idx), dtype=bool)])
        fits[how] = {"fusion": fusion, "model": model, "fused": fused, "points": points, "chosen": chosen,
                     "met": met,
                     "held": held_out(model, cal.Thresholds(match=chosen.match, new=chosen.new), how)}
    how = max(AGGREGATIONS, key=lambda a: (fits[a]["met"], fits[a]["chosen"].report["bcubed_f1"]))
    best = fits[how]
    chosen, met, model, fused = best["chosen"], best["met"], best["model"], best["fused"]

    # Ablation, on the held-out identities only (the fit saw the others): each component alone, the
    # SPEC's weighted mean, and the fitted fusion.
    hid, hids, henc = held_idx, [ids[i] for i in held_idx], [enc[i] for i in held_idx]
    hviews = [views[i] for i in held_idx] if views else None
    ablation = {f"{c} alone": retrieval(_subset(m, hid), hids, henc) for c, m in per_component.items()}
    ablation.update({(v if v.startswith("antler") else f"coat:pattern alone, {v} (shortlist {coat_shortlist} by body)"):
                     retrieval(_subset(m, hid), hids, henc) for v, m in pattern_variants.items()})
    if len(names) > 1:
        ablation["body ensemble, SPEC weighted mean (uncalibrated)"] = retrieval(_subset(unfitted, hid), hids, henc)
    ablation[f"all fused through calibration ({how})"] = retrieval(_subset(fused, hid), hids, henc)
    candidates = {}
    # A candidate the services do not run yet: each other coat pattern matcher as a component of its own,
    # calibrated and weighted like the rest (fitted on the fit half, the same aggregation).
    for v, m in (coat_variants.items() if coat else ()):
        if v not in coat_service:
            cand, _, scores = fit_fusion({**per_component, f"coat:pattern-{v}": m}, how, f"eval-{v}")
            candidates[f"all fused + {v} as a second pattern component (candidate, not in the service; {how})"] = scores
            result.setdefault("candidate_weights", {})[v] = cand["weights"]
    ablation.update({k: retrieval(_subset(m, hid), hids, henc) for k, m in candidates.items()})
    result["ablation_gallery"] = {"identities": len(held_ids), "images": len(held_idx)}
    result["ablation"] = {k: _rows(v) for k, v in ablation.items()}
    if hviews:
        result["ablation_same_viewpoint"] = {
            k: _rows(retrieval(_subset(m, hid), hids, henc, hviews))
            for k, m in [*((f"{c} alone", m) for c, m in per_component.items()),
                         *((f"coat:pattern alone, {v}", m) for v, m in pattern_variants.items()),
                         (f"all fused through calibration ({how})", fused), *candidates.items()]}

    fit = {"identities": len(fit_ids), "images": len(fit_idx), "report": chosen.report}
    held = {"identities": len(held_ids), "images": len(held_idx), "report": best["held"],
            # the sighting protocol (labelled as such): each encounter's images arrive as one sighting
            "with_sightings": held_out(model, cal.Thresholds(match=chosen.match, new=chosen.new), how, enc)}
    artifact_path = calibration_out or settings.calibration_path
    fusion = {k: v for k, v in best["fusion"].items()}
    if coat:
        fusion["coat_version"] = coat_version(settings)
    if antler:
        fusion["antler_version"] = antler_version
    artifact = cal.write_artifact(
        artifact_path, versions=result["embedding_versions"], fusion=fusion, chosen=chosen, met_target=met,
        target=target_false_merge, fit={"identities": len(fit_ids), "images": len(fit_idx),
                                        "identity_names": sorted(fit_ids)},
        held_out={"images": len(held_idx), **best["held"]})
    result["calibration"] = {
        "thresholds": {"match": chosen.match, "new": chosen.new}, "aggregation": how,
        "target_false_merge_rate": target_false_merge, "target_met_on_fit": met, "max_review": max_review,
        "fusion_weights": fusion["weights"], "fusion_intercept": fusion["intercept"],
        "fit": fit, "held_out": held, "artifact": str(artifact_path),
        "by_aggregation": {a: {"thresholds": {"match": f["chosen"].match, "new": f["chosen"].new},
                               "fit_f1": f["chosen"].report["bcubed_f1"], "held_out": f["held"]}
                           for a, f in fits.items()},
        "before": {"fusion": "SPEC weighted mean of raw cosines", "thresholds": {"match": before.match,
                                                                                  "new": before.new},
                   "target_met_on_fit": before_met, "held_out": before_held},
        "seconds": round(time.monotonic() - started, 1)}
    result["_artifact"] = artifact
    if report_dir:
        report_dir.mkdir(parents=True, exist_ok=True)
        curves = {k: v["cmc"] for k, v in ablation.items()}
        first = names[0]
        _, scores, same = cal.component_pairs(per_component[body_component(first)], fit_idx, ids, enc, how)
        result["plots"] = {
            "cmc": str(plot_cmc(curves, report_dir / "cmc.png")),
            "scores": str(plot_scores(scores, same, {}, report_dir / "scores.png")),
            "calibration": str(plot_calibrations(
                {c: cal.component_pairs(per_component[c], fit_idx, ids, enc, how)[1:] for c in per_component},
                fusion["calibrations"], report_dir / "calibration.png")),
            "operating_curve": str(plot_operating_curve(best["points"], chosen, target_false_merge,
                                                        report_dir / "operating_curve.png")),
        }
    write_report({k: v for k, v in result.items() if k != "_artifact"}, report_dir, json_path)
    return result


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


def run_open_set(data: Path, *, mode: str, body_model: str | None, limit: int | None, seed: int, api_url: str,
                 report_dir: Path | None, json_path: Path | None, progress: bool = True,
                 settings: Settings | None = None, stack_models: list[str] = (), sightings: bool = False,
                 review: bool = False) -> dict:
    """Upload the images one by one to the running stack (in `mode`, switched for the run and restored
    after) and score the individuals it built. Each run uses its own site in its own property, so
    earlier runs' individuals are never candidates."""
    import httpx

    from deer_reid.client import auth_headers, switch_pipeline

    headers = auth_headers(settings or Settings())
    installed = _stack_calibration(api_url, headers)
    names = [n.strip() for n in (body_model or ",".join(stack_models)).split(",") if n.strip()]
    fair, fairness = never_trained_on(load_dataset(data), names, settings or Settings())
    samples, held_out = held_out_of(select(fair, limit, seed), (installed or {}).get("artifact"))
    held_out["never_trained_on"] = fairness
    held_out["calibration_id"] = (installed or {}).get("id")
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
