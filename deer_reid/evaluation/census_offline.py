"""`deer-reid eval DATA --protocol census --offline`: the census's own rules on a labelled folder in seconds,
without the stack. A proxy for designing those rules (which question to ask, what a re-solve may move, how
answers weigh); the measurement stays `--protocol census` on the running stack.

The same as on the stack: the graph built from rows shaped as the database holds them
(`shared.census.store.build_graph`: sightings, answers, the uncorroborated `same` answers, calibrated edges),
the clustering, the plan with the calibrated match threshold, the questions and their ranking, an answer
settling the open questions about the same two sides, re-solving every `recluster_every` answers, and a
reviewer wrong with probability `reviewer_error` (seeded).

What stands in for the stack, and why it is close enough to compare rules (stop 28's stack run and this
proxy agree: F1 0.487 and 0.494 after 1,000 answers on nyala's held-out half, fast mode):
- fusion's online decisions: each sighting founds an individual of its own, which is what fusion does where
  no candidate reaches the match threshold (the body alone on identities it never saw, measured on the stack);
- fusion's edges: each detection to its `fusion_candidates` likeliest earlier photos by the fitted fusion among
  its `candidates_k` closest by body (fusion looks candidates up by body, scores them with every component and
  writes an edge to each top candidate's closest photo); the census's own, as the job draws them (each detection's
  `neighbours` nearest among all, by locally scaled body similarity); each edge carries every component's
  score of the pair, from eval's matrices, and the body's is locally scaled as the job scales it;
- the calibration: fitted as `eval --protocol loo` fits it, on the other half of the identities, and refitted
  from the answers as the census job refits it (`shared.census.refit`; `refits=False`: never);
- with `--coat` (enhanced mode's evidence): the coat service's components, scored as fusion scores them,
  against each photo's body shortlist; an edge carries them where its pair was shortlisted (on the stack
  only fusion's edges carry them, so this is a little kinder to the census than the stack).
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from deer_reid.evaluation.calibration import fit_fusion, split_identities
from deer_reid.evaluation.census import answers_to, floor_of_answers, point, sighting_order
from deer_reid.evaluation.coat import coat_features, coat_matrices, coat_shortlists, service_variants
from deer_reid.evaluation.dataset import load_dataset
from deer_reid.evaluation.features import embed_samples
from deer_reid.evaluation.report import plot_census, write_report
from shared.calibrated import FusionModel, logit
from shared.census.graph import UnionFind, cluster, units_of
from shared.census.hubness import LocalScale
from shared.census.hubness import neighbours as nearest_by_body
from shared.census.plan import NewIndividual, plan, questions, sides
from shared.census.refit import RefitRule, labelled_pairs, refit_from_answers
from shared.census.store import build_graph
from shared.components import body_component, component
from shared.config import Settings


def graph_edges(body: np.ndarray, neighbours: int, fusion_candidates: int, hubness_k: int = 0, *,
                fused: np.ndarray | None = None, candidates_k: int = 50) -> tuple[list[tuple[int, int]], np.ndarray]:
    """The scored pairs (i < j) of nodes in upload order, and each node's hubness r: fusion's and the census
    job's (each node's nearest among all, as `shared.census.hubness.neighbours` picks them). Fusion's, as the
    service draws them: each node's `candidates_k` closest earlier photos by the body similarity `body` (its
    candidate lookup), ordered by the `fused` P(same) where it is given (nodes x nodes; the body's order
    breaks ties), the first `fusion_candidates` kept (the top candidates it writes edges to)."""
    n = len(body)
    pairs: set[tuple[int, int]] = set()
    for i in range(n):
        near = np.argsort(-body[i, :i], kind="stable")[:candidates_k]
        if fused is not None:
            near = near[np.argsort(-fused[i, near], kind="stable")]
        for j in near[:fusion_candidates]:
            pairs.add((int(j), i))
    r, nearest = nearest_by_body([(0, body)], n, neighbours, hubness_k)
    return sorted(pairs | set(nearest)), r


def graph_ceiling(pairs: Sequence[tuple[int, int]], identities: Sequence[str], sightings: Sequence[str]) -> dict:
    """The best census the graph allows: each of its pairs that is one animal answered `same` and nothing else
    joined (a sighting's frames one unit from the start). Its B-cubed scores, and the `same` answers it takes
    (one per join of two groups). Far under a target, the graph's edges limit the census and a denser graph
    is the remedy; near or above it, the questions and the evidence that orders them do."""
    n = len(identities)
    groups = UnionFind(n)
    first: dict[str, int] = {}
    for i, s in enumerate(sightings):
        groups.union(i, first.setdefault(s, i))
    one_animal = [(i, j) for i, j in pairs if identities[i] == identities[j]]
    for i, j in one_animal:
        groups.union(i, j)
    ids = [str(i) for i in range(n)]
    best = point(0, {ids[i]: groups.find(i) for i in range(n)}, dict(zip(ids, identities)))
    return {k: best[k] for k in ("bcubed_f1", "bcubed_precision", "bcubed_recall", "predicted_individuals")} | \
        {"same_answers": len(first) - best["predicted_individuals"], "edges": len(pairs),
         "edges_one_animal": len(one_animal)}


def symmetric(per_component: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each component's score of a pair either way round, the higher where both exist (a shortlisted
    component may have scored a pair one way only; NaN: no score)."""
    return {name: np.fmax(m, m.T) for name, m in per_component.items()}


def fused_probabilities(scores: Mapping[str, np.ndarray], model: FusionModel) -> np.ndarray:
    """Each pair's fused P(same) from every component's (`symmetric`) score of it."""
    return np.asarray(model.probability(model.calibrate(dict(scores))))


def pair_scores(scores: Mapping[str, np.ndarray], i: int, j: int) -> dict[str, float]:
    """The components' (`symmetric`) scores of the pair, those it has."""
    return {name: float(m[i, j]) for name, m in scores.items() if np.isfinite(m[i, j])}


def simulate(per_component: Mapping[str, np.ndarray], fusion: Mapping, body: str, identities: Sequence[str],
             sightings: Sequence[str], *, budget: int, reviewer_error: float, recluster_every: int,
             neighbours: int = 10, fusion_candidates: int = 5, candidates_k: int = 50, seed: int = 0,
             match: float = 0.5, assumed_error: float = 0.02, kept: int = 500, hubness_k: int = 0,
             refit: RefitRule | None = None) -> tuple[list[dict], dict]:
    """The census of the nodes (the matrices' rows, in upload order) with the labels answering its questions:
    the curve (a point after every re-solve) and the tallies (`online`: the sightings as individuals, before
    any re-solve; `graph_ceiling`: the best its graph allows). `fusion`: the calibration's fusion section;
    `body`: the component neighbours are drawn by; `kept`: questions a run leaves open; `refit`: the rule to
    refit the calibration from the answers as the census job does (None: never)."""
    model = FusionModel.from_artifact({"fusion": fusion, "version_id": "offline"})
    n = len(identities)
    ids = [str(i) for i in range(n)]
    truth = dict(zip(ids, identities))
    rows = [{"id": ids[i], "sighting": sightings[i], "image_sha256": f"photo{i}", "decided_by": "fusion",
             "state": "new", "individual_id": None} for i in range(n)]
    scores = symmetric(per_component)
    pairs, r = graph_edges(per_component[body], neighbours, fusion_candidates, hubness_k,
                           fused=fused_probabilities(scores, model), candidates_k=candidates_k)
    edges = [{"a": ids[i], "b": ids[j], "components": pair_scores(scores, i, j), "probability": None}
             for i, j in pairs]
    scale = LocalScale(body, dict(zip(ids, r.tolist())), float(r.mean())) if hubness_k > 0 else None
    threshold = float(logit(min(max(match, 0.5), 0.999)))  # the census job's rule
    founders: dict[str, int] = {}
    labels: list = [founders.setdefault(s, len(founders)) for s in sightings]
    fresh = iter(range(len(founders), 2 ** 62))
    answers: list[dict] = []
    rng = np.random.default_rng(seed)
    tally = {"answers": 0, "same": 0, "wrong_answers": 0, "runs": 0, "kinds": {}, "refits": [],
             "online": point(0, dict(zip(ids, labels)), truth),
             "graph_ceiling": graph_ceiling(pairs, identities, sightings)}
    refitted_at = 0  # answered pairs at the last refit tried

    def resolve() -> list:
        nonlocal fusion, model, refitted_at
        snapshot = {"nodes": rows, "edges": edges, "answers": answers}
        graph, index, asked, latest = build_graph(snapshot, model, scale)
        raw, same = labelled_pairs(snapshot, index, latest) if refit else ({}, np.zeros(0, bool))
        if refit and refit.due(same.size, refitted_at):
            refitted_at = same.size
            report = refit_from_answers(raw, same, fusion, refit)
            if report["accepted"]:
                fusion = report["fusion"]
                model = FusionModel.from_artifact({"fusion": fusion, "version_id": f"refit{len(tally['refits'])}"})
                graph, index, asked, latest = build_graph(snapshot, model, scale)
                tally["refits"].append({"answers": tally["answers"], "pairs": report["answers"],
                                        "form": report["form"], "rescaled": fusion.get("rescaled"),
                                        "before": report["before"], "after": report["after"]})
        units = units_of(graph)
        decided = plan(graph, labels, cluster(graph).labels, threshold, units)
        founded: dict[int, int] = {}
        labels[:] = [founded.setdefault(t.cluster, next(fresh)) if isinstance(t, NewIndividual) else t
                     for t in decided.target]
        tally["runs"] += 1
        curve.append(point(tally["answers"], dict(zip(ids, labels)), truth))
        return questions(graph, labels, asked, units=units, reviewer_error=assumed_error)[:kept]

    curve: list[dict] = []
    ranked = resolve()
    since = 0
    while tally["answers"] < budget:
        if not ranked:
            if since == 0:
                break  # re-solved with every answer so far, and nothing is left to ask
            ranked, since = resolve(), 0
            continue
        q = ranked.pop(0)
        same = identities[q.a] == identities[q.b]
        tally["same"] += same
        if rng.random() < reviewer_error:
            same = not same
            tally["wrong_answers"] += 1
        a, b = sorted((ids[q.a], ids[q.b]), key=int)
        answers.append({"id": len(answers), "a": a, "b": b, "answer": "same" if same else "different"})
        tally["answers"] += 1
        tally["kinds"][q.kind] = tally["kinds"].get(q.kind, 0) + 1
        settled = sides(q, ids, labels)
        ranked = [x for x in ranked if sides(x, ids, labels) != settled]
        since += 1
        if since >= recluster_every:
            ranked, since = resolve(), 0
    if since:
        resolve()
    return curve, tally


def run_census_offline(data: Path, *, body_model: str | None, limit: int | None, seed: int, budget: int,
                       reviewer_error: float, recluster_every: int, settings: Settings,
                       report_dir: Path | None, json_path: Path | None, progress: bool = True,
                       allow_random: bool = False, coat: bool = False, refits: bool = True) -> dict:
    from deer_reid.evaluation.run import _base, never_trained_on, select

    name = (body_model or settings.body_model).split(",")[0].strip()
    samples, fairness = never_trained_on(load_dataset(data), [name], settings)
    samples = select(samples, limit, seed)
    started = time.monotonic()
    embeddings, (loaded,) = embed_samples(samples, [name], settings, allow_random=allow_random, progress=progress)
    body = body_component(name)
    per_component = {body: component(body).similarity(list(embeddings[name]), list(embeddings[name]))}
    ids = [s.identity for s in samples]
    enc = [f"{s.identity}/{s.encounter}" for s in samples]
    fitted, held = split_identities(ids, seed)
    fit_rows = [i for i, x in enumerate(ids) if x in fitted]
    positions = [i for i, s in enumerate(samples) if s.identity in held]
    on_edges = dict(per_component)
    if coat:
        # the coat service's components, scored as fusion scores them: against each photo's body shortlist,
        # drawn within each half (a property's gallery is its own animals)
        drawn = coat_shortlists(per_component[body], enc, settings, galleries=[fit_rows, positions])
        scored, _, _ = coat_matrices(coat_features(samples, settings, progress=progress), drawn.mask,
                                     service_variants(settings), variants=(), pattern_mask=drawn.pattern_mask,
                                     cascade=settings.coat_cascade_shortlist, ranked=drawn.ranked)
        per_component.update(scored)
        # on the graph's edges a coat score is there only where fusion scored the pair (its shortlist)
        on_edges.update({name: np.where(drawn.mask, m, np.nan) for name, m in scored.items()})
    fusion = fit_fusion(per_component, fit_rows, ids, enc)
    order = [positions[k] for k in sighting_order([samples[i] for i in positions], seed)]
    order_ids, order_enc = [ids[i] for i in order], [enc[i] for i in order]
    nodes = {name: m[np.ix_(order, order)] for name, m in on_edges.items()}
    refit = RefitRule.of(settings) if refits else None
    curve, tally = simulate(nodes, fusion, body, order_ids, order_enc, budget=budget,
                            reviewer_error=reviewer_error, recluster_every=recluster_every, seed=seed,
                            neighbours=settings.census_neighbours, candidates_k=settings.candidates_k,
                            assumed_error=settings.census_reviewer_error,
                            kept=settings.census_questions_kept, hubness_k=settings.census_hubness_k,
                            refit=refit)
    result = _base("census", "enhanced" if coat else "fast", data, [samples[i] for i in order], seed)
    result.update({
        "offline": True, "body_models": [name], "never_trained_on": fairness,
        "embedding_versions": {name: loaded.version}, "weights_real": not loaded.random_weights,
        "calibration_fitted_on": {"identities": len(fitted), "pairs": fusion["pairs"],
                                  "weights": fusion["weights"]},
        "sightings": len(set(order_enc)), "budget": budget, "reviewer_error": reviewer_error,
        "recluster_every": recluster_every, "refit_rule": refit and asdict(refit), "online": tally.pop("online"),
        "graph_ceiling": tally.pop("graph_ceiling"),
        "answers_floor": floor_of_answers(order_ids, order_enc),
        "curve": curve,
        "tally": tally,
        "reclustered_before_answers": curve[0], "answers_to_f1_90": answers_to(curve, 0.90),
        "answers_to_f1_95": answers_to(curve, 0.95), "baseline": None,
        "baseline_why": "today's way needs the stack's review queue: `--protocol census` without --offline",
        "seconds": round(time.monotonic() - started, 1)})
    result["answers_per_sighting_to_f1_95"] = None if result["answers_to_f1_95"] is None \
        else round(result["answers_to_f1_95"] / result["sightings"], 3)
    if report_dir:
        Path(report_dir).mkdir(parents=True, exist_ok=True)
        result["plots"] = {"census": str(plot_census(result, Path(report_dir) / "census.png"))}
    write_report(result, report_dir, json_path)
    return result
