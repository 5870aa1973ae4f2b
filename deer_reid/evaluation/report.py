"""Plots and the markdown report of an evaluation run."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, ax, path: Path, legend_size: int = 8) -> Path:
    plt = _plt()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_cmc(curves: dict[str, list[float]], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, cmc in curves.items():
        ax.plot(range(1, len(cmc) + 1), cmc, marker="o", ms=3, label=label)
    ax.set(xlabel="rank", ylabel="identification rate", title="CMC (leave-one-encounter-out)", ylim=(0, 1))
    return _save(fig, ax, path)


def plot_scores(scores: np.ndarray, same: np.ndarray, thresholds: dict, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(min(scores.min(), 0), 1, 60)
    ax.hist(scores[~same], bins=bins, alpha=0.6, density=True, label=f"different individuals (n={int((~same).sum())})")
    ax.hist(scores[same], bins=bins, alpha=0.6, density=True, label=f"same individual (n={int(same.sum())})")
    for name, value in thresholds.items():
        ax.axvline(value, ls="--", color="k" if name == "match" else "grey", label=f"{name} threshold {value:.2f}")
    ax.set(xlabel="score (best image of the candidate individual)", ylabel="density",
           title="Scores: same vs different individual (fit part)")
    return _save(fig, ax, path)


def plot_calibrations(pairs: dict[str, tuple[np.ndarray, np.ndarray]], calibrations: dict[str, dict],
                      path: Path) -> Path:
    """Per component: the fitted isotonic P(same) over raw score, with the observed share of same pairs
    in score bins (a reliability plot: points on the curve mean the calibration holds)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for n, (name, (scores, same)) in enumerate(pairs.items()):
        c = calibrations[name]
        color = f"C{n}"
        ax.plot(c["x"], c["y"], color=color, label=f"{name} calibration (centered isotonic)")
        ok = np.isfinite(scores)
        edges = np.quantile(scores[ok], np.linspace(0, 1, 16))
        mids, rates = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = ok & (scores >= lo) & (scores <= hi)
            if m.sum() >= 20:
                mids.append(scores[m].mean())
                rates.append(same[m].mean())
        ax.plot(mids, rates, "o", color=color, ms=4, alpha=0.7, label=f"{name} observed")
    ax.set(xlabel="raw score (identity level)", ylabel="P(same individual)", ylim=(0, 1),
           title="Per-component calibration (fit part)")
    return _save(fig, ax, path, legend_size=7)


def plot_operating_curve(points, chosen, target: float, path: Path) -> Path:
    plt = _plt()
    best_by_match: dict[float, object] = {}
    for p in points:  # for each match threshold, its best new threshold by F1
        cur = best_by_match.get(p.match)
        if cur is None or p.report["bcubed_f1"] > cur.report["bcubed_f1"]:
            best_by_match[p.match] = p
    xs = sorted(best_by_match)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, label in (("false_merge_rate", "false-merge rate (individuals)"),
                       ("false_merge_detection_rate", "false-merge rate (detections)"),
                       ("false_split_rate", "false-split rate"),
                       ("review_rate", "review rate"), ("bcubed_f1", "B-cubed F1")):
        ax.plot(xs, [best_by_match[x].report[key] for x in xs], marker=".", label=label)
    ax.axhline(target, color="red", lw=0.8, ls=":", label=f"false-merge target {target:.0%}")
    ax.axvline(chosen.match, color="k", ls="--", label=f"chosen match {chosen.match:.2f} / new {chosen.new:.2f}")
    ax.set(xlabel="match threshold", ylabel="rate", ylim=(0, 1), title="Operating curve (simulated open set, fit part)")
    return _save(fig, ax, path, legend_size=7)


def plot_census(result: dict, path: Path) -> Path:
    """Human answers against B-cubed F1 and the predicted head count: the census and today's way."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    runs = [("identity graph + questions", result["curve"])]
    if result.get("baseline"):
        runs.append(("today: review queue, oldest first, top 3", result["baseline"]["curve"]))
    for label, curve in runs:
        xs = [p["answers"] for p in curve]
        ax.plot(xs, [p["bcubed_f1"] for p in curve], marker="o", ms=3, label=label)
        bx.plot(xs, [p["predicted_individuals"] for p in curve], marker="o", ms=3, label=label)
    for f1 in (0.90, 0.95):
        ax.axhline(f1, color="grey", lw=0.8, ls=":")
    bx.axhline(result["true_individuals"], color="black", lw=1, ls="--", label="true individuals")
    ax.set(xlabel="human answers", ylabel="B-cubed F1", title="Census quality", ylim=(0, 1))
    bx.set(xlabel="human answers", ylabel="individuals", title="Predicted individuals")
    bx.grid(alpha=0.3)
    bx.legend(fontsize=8)
    return _save(fig, ax, path)


def _fmt(v):
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def markdown(result: dict) -> str:
    lines = [f"# deer-reid evaluation: {result['protocol']}", "",
             f"- data: `{result['data']}` ({result['images']} images, {result['true_individuals']} individuals)",
             f"- mode: {result['mode']}; body models: {', '.join(result['body_models'])}",
             f"- weights real: {result['weights_real']}; embedding versions: "
             + ", ".join(f"`{v}`" for v in result["embedding_versions"].values()),
             f"- seed: {result['seed']}", ""]
    if result["protocol"] == "loo":
        lines += ["## Leave-one-encounter-out retrieval", "",
                  "| gallery | queries | top-1 | top-5 | mAP |", "|---|---|---|---|---|",
                  f"| all | {result['queries']} | {result['top1']:.3f} | {result['top5']:.3f} | {result['mAP']:.3f} |"]
        if result.get("top1_ci95"):
            lo, hi = result["top1_ci95"]
            lines.insert(len(lines) - 3, f"Top-1 {result['top1']:.3f}, 95% interval {lo:.3f}-{hi:.3f} (identities "
                                         "resampled): differences inside it may be luck of the animals drawn.\n")
        if result.get("same_viewpoint"):
            v = result["same_viewpoint"]
            lines.append(f"| same viewpoint | {v['queries']} | {v['top1']:.3f} | {v['top5']:.3f} | {v['mAP']:.3f} |")
        if result.get("levers"):
            lines += ["", "## Levers (all identities of the run)", "", "| lever | queries | top-1 | top-5 | mAP |",
                      "|---|---|---|---|---|"]
            for name, a in result["levers"].items():
                lines.append(f"| {name} | {a['queries']} | {a['top1']:.3f} | {a['top5']:.3f} | {a['mAP']:.3f} |")
        g = result.get("ablation_gallery", {})
        lines += ["", "## Ablation", "",
                  f"On the {g.get('identities')} held-out identities ({g.get('images')} images) that the fusion was "
                  "not fitted on; gallery = those images.", "",
                  "| components | queries | top-1 | top-5 | mAP |", "|---|---|---|---|---|"]
        for name, a in result["ablation"].items():
            lines.append(f"| {name} | {a['queries']} | {a['top1']:.3f} | {a['top5']:.3f} | {a['mAP']:.3f} |")
        for name, a in (result.get("ablation_same_viewpoint") or {}).items():
            lines.append(f"| {name}, same viewpoint | {a['queries']} | {a['top1']:.3f} | {a['top5']:.3f} | "
                         f"{a['mAP']:.3f} |")
        if result.get("coat_cascade"):
            c = result["coat_cascade"]
            lines += ["", f"Coat cascade: RootSIFT verifies the {c['cascade_shortlist']} of the "
                      f"{c['pattern_shortlist']} pattern-shortlist photos XFeat matched best. Against every pair "
                      f"matched, on {c['queries']} held-out queries ({c['decided_as']}): the same decision for "
                      f"{c['same_decision']:.3f}, the same first photo for {c['same_first_photo']:.3f} "
                      f"(decisions {c['decisions']['cascade']} against {c['decisions']['every_pair']})."]
        if result.get("viewpoint"):
            v = result["viewpoint"]
            lines += ["", "## Viewpoint (the pose service's classifier)", "",
                      f"- classifier `{v['classifier']}` on `{v['backbone']}`, unknown below {v['threshold']:.3f}; "
                      f"predicted: {v['predicted']}"]
            if v.get("accuracy_against_labels"):
                a = v["accuracy_against_labels"]
                lines.append(f"- against the labels, on {v['accuracy_identities']} identities it never learned "
                             f"({a['photos']} photos): accuracy {a['accuracy']:.3f} (unknown counted wrong), answered "
                             f"{a['answered']:.3f}, accuracy of answers {a['accuracy_answered']:.3f}, always answering "
                             f"{a['accuracy_without_unknown']:.3f}; confusion {a['confusion']}")
            if v.get("component"):
                lines.append(f"- {v['component']}")
        lines += ["", "Only the components this data can exercise are rows: temporal priors need capture times "
                  "and places, which this data does not have.", ""]
    if "calibration" in result:
        c = result["calibration"]
        lines += ["## Thresholds", "",
                  f"Fitted on {c['fit']['identities']} identities ({c['fit']['images']} images), reported on the other "
                  f"{c['held_out']['identities']} identities ({c['held_out']['images']} images), split by identity "
                  f"with seed {result['seed']}. Target false-merge rate {c['target_false_merge_rate']:.1%}, "
                  f"held by individuals and by detections alike"
                  + ("" if c["target_met_on_fit"] else " (NOT reachable on the fit part: safest point chosen)") + ".",
                  "", f"- match threshold: **{c['thresholds']['match']:.3f}**, new-individual threshold: "
                  f"**{c['thresholds']['new']:.3f}**", f"- artifact: `{c['artifact']}`", "",
                  "| part | B-cubed P | B-cubed R | F1 | false-merge | false-merge (detections) | false-split | "
                  "review | predicted / true individuals |", "|---|---|---|---|---|---|---|---|---|"]
        parts = [("fit", c["fit"]["report"]), ("held_out", c["held_out"]["report"])]
        if c["held_out"].get("with_sightings"):
            parts.append(("held_out, sighting protocol (encounters as sightings)", c["held_out"]["with_sightings"]))
        if c.get("before"):
            parts.append(("held_out, before (SPEC weighted mean)", c["before"]["held_out"]))
        for a, f in (c.get("by_aggregation") or {}).items():
            parts.append((f"held_out, aggregation {a}", f["held_out"]))
        for part, r in parts:
            lines.append(f"| {part} | {r['bcubed_precision']:.3f} | {r['bcubed_recall']:.3f} | {r['bcubed_f1']:.3f} | "
                         f"{r['false_merge_rate']:.3f} | {r['false_merge_detection_rate']:.3f} | "
                         f"{r['false_split_rate']:.3f} | {r['review_rate']:.3f} | "
                         f"{r['predicted_individuals']} / {r['true_individuals']} |")
        lines.append("")
    if result["protocol"] == "open-set":
        lines += ["## Open-set sequential ingestion through the running stack", "",
                  "| metric | value |", "|---|---|"]
        for key in ("bcubed_precision", "bcubed_recall", "bcubed_f1", "false_merge_rate",
                    "false_merge_detection_rate", "false_split_rate", "predicted_individuals", "true_individuals",
                    "review_rate", "failed", "thresholds"):
            lines.append(f"| {key} | {_fmt(result.get(key))} |")
        lines += ["", result.get("temporal_note", ""), ""]
    if result["protocol"] == "census":
        lines += _census_lines(result)
    if result.get("plots"):
        lines += ["## Plots", ""] + [f"![{k}]({Path(v).name})" for k, v in result["plots"].items()] + [""]
    return "\n".join(lines)


def _census_lines(result: dict) -> list[str]:
    def reached(v) -> str:
        return "not reached" if v is None else _fmt(v)

    def row(label: str, p: dict) -> str:
        return (f"| {label} | {p['answers']} | {p['bcubed_precision']:.3f} | {p['bcubed_recall']:.3f} | "
                f"{p['bcubed_f1']:.3f} | {p['false_merge_rate']:.3f} | {p['predicted_individuals']} |")

    head = ["| | answers | B-cubed P | B-cubed R | F1 | false-merge | predicted individuals |",
            "|---|---|---|---|---|---|---|"]
    lines = ["## Census with people in the loop", "",
             f"{result['sightings']} sightings ({result['images']} photos) of {result['true_individuals']} "
             "individuals, "
             f"uploaded sighting by sighting in a seeded order; reviewer wrong with probability "
             f"{result['reviewer_error']}, re-solved every {result['recluster_every']} answers, budget "
             f"{result['budget']}.",
             "", f"- answers to F1 0.90: {reached(result['answers_to_f1_90'])}; to F1 0.95: "
             f"{reached(result['answers_to_f1_95'])} ({reached(result['answers_per_sighting_to_f1_95'])} per sighting)"]
    if result.get("answers_floor"):
        f = result["answers_floor"]
        lines.append(f"- the floor (people join every sighting, each question a `same`, each answer right): F1 0.90 "
                     f"after {reached(f['f1_90'])} answers, 0.95 after {reached(f['f1_95'])} "
                     f"({reached(f['per_sighting_f1_95'])} per sighting)")
    if result.get("graph_ceiling"):
        c = result["graph_ceiling"]
        lines.append(f"- the graph's ceiling (every pair of it that is one animal answered `same`): F1 "
                     f"{c['bcubed_f1']:.3f}, recall {c['bcubed_recall']:.3f}, {c['predicted_individuals']} individuals, "
                     f"after {c['same_answers']} `same` answers; {c['edges_one_animal']} of its {c['edges']} edges "
                     "join one animal")
    if result.get("baseline"):
        b = result["baseline"]
        lines.append("- today's way (review queue, oldest first, top 3): to F1 0.90: "
                     f"{reached(b['answers_to_f1_90'])}; "
                     f"to F1 0.95: {reached(b['answers_to_f1_95'])}; {b['session']['decisions']} review decisions")
    lines += ["", *head, row("online decisions (fusion, one at a time)", result["online"]),
              row("re-clustered, no answer yet", result["curve"][0])]
    for p in result["curve"][1:]:
        lines.append(row("after answers", p))
    if result.get("baseline"):
        lines += ["", "Today's way, on byte-different copies of the same photos:", "", *head,
                  row("online decisions", result["baseline"]["online"])]
        lines += [row("after review decisions", p) for p in result["baseline"]["curve"][1:]]
    return lines + [""]


def write_report(result: dict, report_dir: Path | None, json_path: Path | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2, default=str))
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        (Path(report_dir) / "report.md").write_text(markdown(result))
