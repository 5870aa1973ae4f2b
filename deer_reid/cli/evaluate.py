"""eval: re-identification accuracy on a labelled folder (loo, open-set, census)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from deer_reid.cli.context import api, settings_for
from deer_reid.cli.output import print_json
from deer_reid.cli.parsing import add_command
from deer_reid.client import api_url


def register(commands) -> None:
    ev = add_command(commands, "eval", cmd_eval, help="measure re-identification accuracy on a labelled folder")
    ev.add_argument("data_dir", help="folder with metadata.csv (path, identity[, viewpoint, encounter, ...])")
    ev.add_argument("--protocol", choices=("loo", "open-set", "census", "keypoints"), required=True,
                    help="loo: retrieval and the fitted fusion; open-set: the running stack's online decisions; "
                    "census: the identity graph with the labels answering its questions (and today's way beside "
                    "it); keypoints: a pattern matcher's keypoint-budget curve, accuracy beside milliseconds")
    ev.add_argument("--budgets", default="700:0.04,1500:0.01,3000:0.01,4000:0.005",
                    help="keypoints: KEYPOINTS[:SIFT_CONTRAST],... (the contrast only matters to rootsift)")
    ev.add_argument("--matcher", choices=("rootsift", "xfeat"), default="rootsift", help="keypoints: which matcher")
    ev.add_argument("--half", choices=("fit", "held-out"), default="fit",
                    help="keypoints: the identities to draw the curve on (a budget is chosen on the fit half)")
    ev.add_argument("--budget", type=int, default=1000, help="census: the most answers the labels give")
    ev.add_argument("--reviewer-error", type=float, default=0.02, help="census: how often the reviewer is wrong "
                    "(seeded)")
    ev.add_argument("--recluster-every", type=int, default=10, help="census: answers between re-solves")
    ev.add_argument("--no-baseline", action="store_true", help="census: skip today's way (the review queue) "
                    "on copies of the photos")
    ev.add_argument("--offline", action="store_true", help="census: the census's own rules without the stack, "
                    "on the photos' body similarities (seconds: a proxy for designing the rules, no baseline)")
    ev.add_argument("--no-refit", action="store_true", help="census --offline: never refit the calibration from "
                    "the answers (the census job refits it once there are enough)")
    ev.add_argument("--mode", choices=("fast", "enhanced"), default="fast")
    ev.add_argument("--body-model", help="body model(s), comma-separated for an ensemble")
    ev.add_argument("--json", help="write the full result here")
    ev.add_argument("--report", help="folder for report.md and the plots (default reports/eval-...)")
    ev.add_argument("--limit", type=int, help="use whole identities (seeded) up to this many images")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--target-false-merge", type=float, default=0.02)
    ev.add_argument("--max-review", type=float, help="loo: prefer thresholds that send at most this share of "
                    "detections to review (given way when no point also meets the false-merge target)")
    ev.add_argument("--calibration-out", type=Path, help="where to write the calibration artifact "
                    "(default $DEER_HOME/calibration.json)")
    ev.add_argument("--install", action="store_true", help="loo: also install the artifact in the running "
                    "stack (fusion uses it from its next batch); same as `deer-reid calibration install`")
    ev.add_argument("--holdout-of", metavar="NAME", help="loo: only the identities trained model NAME held out "
                    "(to compare models on the same animals); trained models' own identities are always left out")
    ev.add_argument("--coat", action="store_true", help="loo: add the coat service's components (colour, "
                    "markings, pattern matching) and measure each, and all fused; census --offline: with them")
    ev.add_argument("--coat-shortlist", type=int, metavar="K", help="loo --coat and keypoints: gallery photos each "
                    "photo's coat is compared with, its K closest by body (default: the service's DEER_COAT_SHORTLIST)")
    ev.add_argument("--sightings", action="store_true", help="open-set: upload each encounter as one sighting "
                    "(the sighting protocol; reported as such)")
    ev.add_argument("--pose", action="store_true", help="loo: add the pose-aware component (body similarity to "
                    "photos of the same viewpoint, as the pose service's viewpoint classifier predicts it)")
    ev.add_argument("--viewpoint-model", metavar="NAME", help="the viewpoint classifier to measure (where the data "
                    "has a viewpoint column) and to compare with under --pose (default DEER_POSE_VIEWPOINT_MODEL)")
    ev.add_argument("--antler", action="store_true", help="loo: the males only (DATA/sex.csv), with the antler "
                    "service's fingerprint as a component (on nyala: horns, which are not antlers)")
    ev.add_argument("--antler-ignore-cut", action="store_true", help="with --antler: fingerprint racks that run into "
                    "the photo's top edge too (the service gives them no evidence)")
    ev.add_argument("--review", action="store_true", help="open-set: then work the review queue with the labels as "
                    "the reviewer, and report how often the right individual was among the page's top 3")
    ev.add_argument("--allow-random-weights", action="store_true")
    ev.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="as the body service (default auto)")
    ev.add_argument("--api-url")
    ev.add_argument("--quiet", action="store_true")


def cmd_eval(args) -> int:
    from deer_reid.evaluation.dataset import DatasetError
    from deer_reid.evaluation.run import run_loo, run_open_set

    settings = settings_for(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report_dir = Path(args.report) if args.report else Path("reports") / f"eval-{args.protocol}-{stamp}"
    try:
        if args.protocol == "keypoints":
            from deer_reid.evaluation.keypoints import parse_budgets, run_keypoints

            result = run_keypoints(Path(args.data_dir), budgets=parse_budgets(args.budgets), matcher=args.matcher,
                                   half=args.half, shortlist=args.coat_shortlist or settings.coat_shortlist,
                                   limit=args.limit, seed=args.seed, settings=settings, report_dir=report_dir,
                                   json_path=args.json, progress=not args.quiet)
        elif args.protocol == "loo":
            result = run_loo(Path(args.data_dir), mode=args.mode, body_model=args.body_model, limit=args.limit,
                             seed=args.seed, report_dir=report_dir, json_path=args.json,
                             target_false_merge=args.target_false_merge, calibration_out=args.calibration_out,
                             settings=settings, allow_random=args.allow_random_weights, progress=not args.quiet,
                             holdout_of=args.holdout_of, max_review=args.max_review, coat=args.coat,
                             coat_shortlist=args.coat_shortlist, antler=args.antler,
                             antler_ignore_cut=args.antler_ignore_cut, pose=args.pose,
                             viewpoint_model=args.viewpoint_model)
        else:
            from deer_reid.stack import read_state

            state = read_state(settings.home) or {}
            stack_models = [m for m in [state.get("body_model"), *(state.get("body_ensemble") or [])] if m]
        if args.protocol == "census" and args.offline:
            from deer_reid.evaluation.census_offline import run_census_offline

            result = run_census_offline(Path(args.data_dir), body_model=args.body_model, limit=args.limit,
                                        seed=args.seed, budget=args.budget, reviewer_error=args.reviewer_error,
                                        recluster_every=args.recluster_every, settings=settings,
                                        report_dir=report_dir, json_path=args.json, progress=not args.quiet,
                                        allow_random=args.allow_random_weights, coat=args.coat,
                                        refits=not args.no_refit)
        elif args.protocol == "census":
            from deer_reid.evaluation.census import run_census

            result = run_census(Path(args.data_dir), mode=args.mode, body_model=args.body_model, limit=args.limit,
                                seed=args.seed, api_url=api_url(settings, args.api_url), report_dir=report_dir,
                                json_path=args.json, budget=args.budget, reviewer_error=args.reviewer_error,
                                recluster_every=args.recluster_every, baseline=not args.no_baseline,
                                progress=not args.quiet, settings=settings, stack_models=stack_models)
        elif args.protocol == "open-set":
            result = run_open_set(Path(args.data_dir), mode=args.mode, body_model=args.body_model, limit=args.limit,
                                  seed=args.seed, api_url=api_url(settings, args.api_url), report_dir=report_dir,
                                  json_path=args.json, progress=not args.quiet, settings=settings,
                                  stack_models=stack_models, sightings=args.sightings, review=args.review)
    except (DatasetError, ValueError, KeyError, RuntimeError) as exc:
        print(f"deer-reid eval: {exc}", file=sys.stderr)
        return 2
    if args.protocol == "loo" and args.install:
        installed = api(args, "POST", "/v1/calibration", json=result.pop("_artifact"))
        result["calibration"]["installed_id"] = installed["id"]
    result.pop("_artifact", None)
    skip = {"cmc", "ablation", "ablation_same_viewpoint", "calibration", "plots", "levers", "census_now"}
    print_json({k: v for k, v in result.items() if k not in skip})
    if "ablation" in result:
        print("\nablation (loo):")
        for name, a in result["ablation"].items():
            print(f"  {name:45s} queries {a['queries']:5d}  top-1 {a['top1']:.3f}  top-5 {a['top5']:.3f}  "
                  f"mAP {a['mAP']:.3f}")
    for name, a in (result.get("levers") or {}).items():
        print(f"  lever: {name:52s} queries {a['queries']:5d}  top-1 {a['top1']:.3f}  top-5 {a['top5']:.3f}  "
              f"mAP {a['mAP']:.3f}")
    if "calibration" in result:
        c = result["calibration"]
        print(f"\nthresholds (fit on {c['fit']['identities']} identities): match {c['thresholds']['match']:.3f}, "
              f"new {c['thresholds']['new']:.3f}; artifact {c['artifact']}")
        parts = [("fit", c["fit"]["report"]), ("held_out", c["held_out"]["report"]),
                 ("sighting", c["held_out"]["with_sightings"]), ("before", c["before"]["held_out"])]
        for part, r in parts:
            print(f"  {part:8s} B3 P/R/F1 {r['bcubed_precision']:.3f}/{r['bcubed_recall']:.3f}/{r['bcubed_f1']:.3f}"
                  f"  false-merge {r['false_merge_rate']:.3f}  false-split {r['false_split_rate']:.3f}"
                  f"  review {r['review_rate']:.3f}  individuals {r['predicted_individuals']}/{r['true_individuals']}")
    print(f"\nreport: {report_dir / 'report.md'}")
    return 0
