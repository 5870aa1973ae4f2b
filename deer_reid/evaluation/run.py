"""`deer-reid eval`: the loo and open-set protocols, end to end."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deer_reid.evaluation import calibration as cal
from deer_reid.evaluation.dataset import Sample, load_dataset
from deer_reid.evaluation.features import embed_samples, similarity
from deer_reid.evaluation.metrics import clustering_report, retrieval
from deer_reid.evaluation.report import plot_cmc, plot_operating_curve, plot_scores, write_report
from shared.config import Settings
from shared.schemas import sex_of

TEMPORAL_OFF = ("Temporal priors were off for this run: the data has no capture times or places, and "
                "invented times would measure nothing. (The fusion service has no temporal scoring yet either.)")


def select(samples: list[Sample], limit: int | None, seed: int) -> list[Sample]:
    """Whole identities in a seeded order until `limit` images (all of them without a limit)."""
    if not limit or limit >= len(samples):
        return samples
    by_identity: dict[str, list[Sample]] = {}
    for s in samples:
        by_identity.setdefault(s.identity, []).append(s)
    names = sorted(by_identity)
    chosen: list[Sample] = []
    for i in np.random.default_rng(seed).permutation(len(names)):
        chosen.extend(by_identity[names[i]])
        if len(chosen) >= limit:
            break
    return [Sample(**{**s.__dict__, "index": n}) for n, s in enumerate(chosen[:limit])]


def _model_names(mode: str, body_model: str | None, settings: Settings) -> list[str]:
    default = settings.body_model if mode == "fast" else (settings.body_ensemble or settings.body_model)
    names = [n.strip() for n in (body_model or default).split(",") if n.strip()]
    if mode == "fast" and len(names) > 1:
        raise ValueError("fast mode runs one body model; give one name, or --mode enhanced")
    return names


def _base(protocol: str, mode: str, data: Path, samples: list[Sample], seed: int) -> dict:
    return {"protocol": protocol, "mode": mode, "data": str(data), "images": len(samples),
            "true_individuals": len({s.identity for s in samples}), "seed": seed}


def run_loo(data: Path, *, mode: str, body_model: str | None, limit: int | None, seed: int, report_dir: Path | None,
            json_path: Path | None, target_false_merge: float, calibration_out: Path | None,
            settings: Settings, allow_random: bool = False, progress: bool = True) -> dict:
    samples = select(load_dataset(data), limit, seed)
    names = _model_names(mode, body_model, settings)
    embeddings, models = embed_samples(samples, names, settings, allow_random=allow_random, progress=progress)
    ids = [s.identity for s in samples]
    enc = [s.encounter for s in samples]
    sexes = [sex_of(s.cls) for s in samples]
    weights = {n: settings.weights().get(n, 1.0) for n in names}  # as fusion weighs them
    sim = similarity(embeddings, weights)
    result = _base("loo", mode, data, samples, seed)
    result.update({
        "body_models": names,
        "embedding_versions": {m.spec.name: m.version for m in models},
        "weights_real": not any(m.random_weights for m in models),
        "precision": {m.spec.name: m.precision for m in models},
    })
    main = retrieval(sim, ids, enc)
    result.update({k: main[k] for k in ("queries", "top1", "top5", "mAP")})
    result["cmc"] = main["cmc"]
    if all(s.viewpoint for s in samples):
        vp = retrieval(sim, ids, enc, [s.viewpoint for s in samples])
        result["same_viewpoint"] = {k: vp[k] for k in ("queries", "top1", "top5", "mAP")}
    per_model = {n: embeddings[n] @ embeddings[n].T for n in names}
    ablation = {f"body ({n})": retrieval(per_model[n], ids, enc) for n in names}
    if len(names) > 1:
        ablation[f"body (ensemble {'+'.join(names)})"] = main
    result["ablation"] = {k: {m: v[m] for m in ("queries", "top1", "top5", "mAP")} for k, v in ablation.items()}

    # Thresholds: fit on one half of the identities, report on the other.
    fit_ids, held_ids = cal.split_identities(ids, seed)
    fit_idx = [i for i, s in enumerate(samples) if s.identity in fit_ids]
    held_idx = [i for i, s in enumerate(samples) if s.identity in held_ids]
    started = time.monotonic()
    points = cal.operating_curve(per_model, fit_idx, ids, sexes, seed, weights=weights)
    chosen, met = cal.choose(points, target_false_merge)
    held_order = [int(i) for i in np.random.default_rng(seed + 1).permutation(np.asarray(held_idx))]
    placed = cal.simulate(per_model, held_order, sexes, cal.Thresholds(match=chosen.match, new=chosen.new),
                          weights=weights)
    held_report = clustering_report([placed[i] for i in held_order], [ids[i] for i in held_order])
    scores, same = cal.identity_pairs(sim, fit_idx, ids, enc)
    isotonic = cal.fit_isotonic(scores, same)
    fit = {"identities": len(fit_ids), "images": len(fit_idx), "report": chosen.report}
    held = {"identities": len(held_ids), "images": len(held_idx), "report": held_report}
    artifact_path = calibration_out or settings.calibration_path
    cal.write_artifact(artifact_path, versions=result["embedding_versions"], weights=weights,
                       chosen=chosen, met_target=met, target=target_false_merge, isotonic=isotonic,
                       fit={**{k: v for k, v in fit.items() if k != "report"},
                            "identity_names": sorted(fit_ids)},
                       held_out={"images": len(held_idx), **held_report})
    result["calibration"] = {"thresholds": {"match": chosen.match, "new": chosen.new},
                             "target_false_merge_rate": target_false_merge, "target_met_on_fit": met,
                             "fit": fit, "held_out": held, "artifact": str(artifact_path),
                             "seconds": round(time.monotonic() - started, 1)}
    if report_dir:
        report_dir.mkdir(parents=True, exist_ok=True)
        curves = {k: v["cmc"] for k, v in ablation.items()}
        result["plots"] = {
            "cmc": str(plot_cmc(curves, report_dir / "cmc.png")),
            "scores": str(plot_scores(scores, same, {"match": chosen.match, "new": chosen.new},
                                      report_dir / "scores.png")),
            "operating_curve": str(plot_operating_curve(points, chosen, target_false_merge,
                                                        report_dir / "operating_curve.png")),
        }
    write_report(result, report_dir, json_path)
    return result


async def _open_set(api_url: str, samples: list[Sample], order: list[int], site: str, fallback_time: str,
                    progress: bool) -> list[dict]:
    import httpx

    from shared.states import TERMINAL

    out: list[dict] = [{} for _ in samples]
    async with httpx.AsyncClient(base_url=api_url, timeout=60) as client:
        for i in tqdm(order, desc="open-set", unit="img", disable=not progress):
            s = samples[i]
            fields = {"site": site, "camera": s.camera or "eval", "cls": s.cls.value,
                      "fallback_captured_at": s.captured_at or fallback_time}
            resp = await client.post("/v1/uploads", data=fields,
                                     files=[("files", (s.path.name, s.path.read_bytes(), "image/jpeg"))])
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


def held_out_of(samples: list[Sample], calibration: Path | None) -> tuple[list[Sample], dict]:
    """The samples whose identities the calibration artifact was not fitted on (all without an artifact).

    The running fusion service decides with the artifact's thresholds, so scoring it on the
    images those thresholds were chosen on would report the fit, not the system.
    """
    from services.fusion.calibration import load_artifact

    artifact = load_artifact(calibration) if calibration else None
    fitted = set((artifact or {}).get("fit", {}).get("identity_names", []))
    if not fitted:
        return samples, {"calibration_artifact": str(calibration) if artifact else None, "identities_excluded": 0}
    kept = [s for s in samples if s.identity not in fitted]
    if not kept:
        raise ValueError(f"every identity of the data was used to fit {calibration}: nothing is left to report on")
    return [Sample(**{**s.__dict__, "index": n}) for n, s in enumerate(kept)], {
        "calibration_artifact": str(calibration), "identities_excluded": len({s.identity for s in samples} & fitted),
        "images_excluded": len(samples) - len(kept)}


def run_open_set(data: Path, *, mode: str, body_model: str | None, limit: int | None, seed: int, api_url: str,
                 report_dir: Path | None, json_path: Path | None, progress: bool = True,
                 calibration: Path | None = None) -> dict:
    samples, held_out = held_out_of(select(load_dataset(data), limit, seed), calibration)
    order = [int(i) for i in np.random.default_rng(seed).permutation(len(samples))]
    site = f"eval-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-s{seed}"
    has_time = all(s.captured_at for s in samples)
    started = time.monotonic()
    dets = asyncio.run(_open_set(api_url, samples, order, site, "2025-11-01T06:00:00Z", progress))
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
        "temporal": "off",
        "temporal_note": TEMPORAL_OFF if not has_time else "Temporal priors are not implemented yet: off.",
        "wall_s": round(wall, 1), "detections_per_s": round(len(samples) / wall, 2),
    })
    if body_model and set(n.strip() for n in body_model.split(",")) != set(versions):
        result["warning"] = f"--body-model {body_model} differs from the running stack's models {list(versions)}"
    write_report(result, report_dir, json_path)
    return result
