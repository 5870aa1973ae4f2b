"""The loo protocol's last stage: its JSON, the calibration artifact the fit produced, the plots and the report."""
from __future__ import annotations

import time
from pathlib import Path

from deer_reid.evaluation import calibration as cal
from deer_reid.evaluation.loo_components import BodyNetworks, Components
from deer_reid.evaluation.loo_fit import Ablation, Fitted, Fitter, figures
from deer_reid.evaluation.report import plot_calibrations, plot_cmc, plot_scores, plot_operating_curve, write_report
from shared.components import body_component


def _plots(report_dir: Path, fitter: Fitter, fitted: Fitted, ablation: Ablation, fusion: dict,
           first_body: str) -> dict[str, str]:
    report_dir.mkdir(parents=True, exist_ok=True)
    split, photos, how = fitter.split, fitter.photos, fitted.aggregation
    pairs = {c: cal.component_pairs(m, split.fit, photos.identities, photos.encounters, how)[1:]
             for c, m in fitter.per_component.items()}
    scores, same = pairs[body_component(first_body)]
    return {
        "cmc": str(plot_cmc({k: v["cmc"] for k, v in ablation.rows.items()}, report_dir / "cmc.png")),
        "scores": str(plot_scores(scores, same, {}, report_dir / "scores.png")),
        "calibration": str(plot_calibrations(pairs, fusion["calibrations"], report_dir / "calibration.png")),
        "operating_curve": str(plot_operating_curve(fitted.best.points, fitted.best.chosen,
                                                    fitter.target_false_merge, report_dir / "operating_curve.png")),
    }


def report(header: dict, body: BodyNetworks, components: Components, all_identities: dict, fitter: Fitter,
           fitted: Fitted, ablation: Ablation, *, artifact_path: Path, report_dir: Path | None,
           json_path: Path | None) -> dict:
    """The run's result (the artifact written under `_artifact`), and its JSON and report files.

    `header` opens the JSON (what the run is, and which photos it measured on)."""
    split, best = fitter.split, fitted.best
    result = {**header, "body_models": body.names,
              "embedding_versions": {m.spec.name: m.version for m in body.models},
              "weights_real": not any(m.random_weights for m in body.models),
              "precision": {m.spec.name: m.precision for m in body.models}}
    if components.coat:
        result["coat"] = components.coat.notes
    if components.antler:
        result["antler"] = components.antler.notes
    if components.viewpoint_notes:
        result["viewpoint"] = components.viewpoint_notes
    result.update(all_identities)
    if ablation.candidate_weights:
        result["candidate_weights"] = ablation.candidate_weights
    result["ablation_gallery"] = {"identities": len(split.held_ids), "images": len(split.held)}
    result["ablation"] = {k: figures(v) for k, v in ablation.rows.items()}
    if ablation.cascade is not None:
        result["coat_cascade"] = ablation.cascade
    if ablation.same_viewpoint is not None:
        result["ablation_same_viewpoint"] = {k: figures(v) for k, v in ablation.same_viewpoint.items()}

    fusion = {**best.fusion,
              **({"coat_version": components.coat.version} if components.coat else {}),
              **({"antler_version": components.antler.version} if components.antler else {})}
    artifact = cal.write_artifact(
        artifact_path, versions=result["embedding_versions"], fusion=fusion, chosen=best.chosen, met_target=best.met,
        target=fitter.target_false_merge, fit={"identities": len(split.fit_ids), "images": len(split.fit),
                                               "identity_names": sorted(split.fit_ids)},
        held_out={"images": len(split.held), **best.held})
    before = fitted.before
    result["calibration"] = {
        "thresholds": {"match": best.chosen.match, "new": best.chosen.new}, "aggregation": fitted.aggregation,
        "target_false_merge_rate": fitter.target_false_merge, "target_met_on_fit": best.met,
        "max_review": fitter.max_review, "fusion_weights": fusion["weights"], "fusion_intercept": fusion["intercept"],
        "fit": {"identities": len(split.fit_ids), "images": len(split.fit), "report": best.chosen.report},
        "held_out": {"identities": len(split.held_ids), "images": len(split.held), "report": best.held,
                     "with_sightings": fitted.held_with_sightings},
        "artifact": str(artifact_path),
        "by_aggregation": {a: {"thresholds": {"match": f.chosen.match, "new": f.chosen.new},
                               "fit_f1": f.chosen.report["bcubed_f1"], "held_out": f.held}
                           for a, f in fitted.by_aggregation.items()},
        "before": {"fusion": "SPEC weighted mean of raw cosines",
                   "thresholds": {"match": before.chosen.match, "new": before.chosen.new},
                   "target_met_on_fit": before.met, "held_out": before.held},
        "seconds": round(time.monotonic() - fitted.started, 1)}
    result["_artifact"] = artifact
    if report_dir:
        result["plots"] = _plots(report_dir, fitter, fitted, ablation, fusion, body.names[0])
    write_report({k: v for k, v in result.items() if k != "_artifact"}, report_dir, json_path)
    return result
