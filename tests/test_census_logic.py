"""The identity graph's rules, fast and pure: clustering, the hard rules, what the census job moves and asks."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from shared.calibrated import FusionModel, fit_components
from shared.census.graph import IdentityGraph, Infeasible, bridges, cluster, objective, violations
from shared.census.hubness import LocalScale
from shared.census.hubness import neighbours as hub_neighbours
from shared.census.plan import NewIndividual, plan, questions, stopping, verifications
from shared.census.store import build_graph
from shared.census.refit import RefitRule, clear_gain, refit_from_answers, reliability

STRONG, WEAK = 4.0, 0.5


def graph_of(n, edges, must=(), cannot=(), anchors=None) -> IdentityGraph:
    g = IdentityGraph(n, must=list(must), cannot=list(cannot), anchors=dict(anchors or {}))
    for i, j, w in edges:
        g.add_edge(i, j, w)
    return g


def groups(labels) -> set[frozenset]:
    out: dict = {}
    for i, c in enumerate(labels):
        out.setdefault(c, set()).add(i)
    return {frozenset(v) for v in out.values()}


def test_positive_evidence_joins_and_negative_evidence_separates():
    g = graph_of(5, [(0, 1, STRONG), (1, 2, STRONG), (3, 4, STRONG), (2, 3, -STRONG), (0, 2, WEAK)])
    assert groups(cluster(g).labels) == {frozenset({0, 1, 2}), frozenset({3, 4})}


def test_a_chain_is_cut_where_the_evidence_against_outweighs_it():
    # 0-1 and 1-2 weakly linked, 0-2 strongly different: the objective keeps the stronger pair apart
    g = graph_of(3, [(0, 1, WEAK), (1, 2, 2 * WEAK), (0, 2, -STRONG)])
    labels = cluster(g).labels
    assert labels[0] != labels[2]
    assert labels[1] == labels[2]


def test_unscored_pairs_weigh_nothing():
    g = graph_of(4, [(0, 1, STRONG), (2, 3, STRONG)])
    assert groups(cluster(g).labels) == {frozenset({0, 1}), frozenset({2, 3})}


def test_cannot_link_is_never_broken_even_against_strong_evidence():
    g = graph_of(3, [(0, 1, STRONG), (1, 2, STRONG), (0, 2, STRONG)], cannot=[(0, 2)])
    labels = cluster(g).labels
    assert labels[0] != labels[2]
    assert violations(g, labels) == []


def test_must_link_holds_against_negative_evidence():
    g = graph_of(3, [(0, 1, -STRONG), (1, 2, STRONG)], must=[(0, 1)])
    labels = cluster(g).labels
    assert labels[0] == labels[1]
    assert violations(g, labels) == []


def test_two_anchored_individuals_are_never_joined_by_the_machine():
    g = graph_of(3, [(0, 1, STRONG), (1, 2, STRONG), (0, 2, STRONG)], anchors={0: 10, 2: 11})
    labels = cluster(g).labels
    assert labels[0] != labels[2]
    assert labels[1] in (labels[0], labels[2])


def test_contradictory_hard_rules_are_refused():
    with pytest.raises(Infeasible):
        cluster(graph_of(3, [], must=[(0, 1), (1, 2)], cannot=[(0, 2)]))
    with pytest.raises(Infeasible):
        cluster(graph_of(2, [], must=[(0, 1)], anchors={0: 1, 1: 2}))


def test_moves_repair_what_greedy_contraction_decided_too_early():
    # GAEC contracts 0-2 (1.5), then 1 joins them (1.4 - 0.5 > 0) and stops at {0, 1, 2} {3} {4} = 2.4;
    # moving 0 to 4 and 3 to {1, 2} reaches {0, 4} {1, 2, 3} = 1.4 + 1.4 + 0.0 + 0.4 = 3.2
    edges = [(0, 1, -0.5), (0, 2, 1.5), (0, 3, -2.7), (0, 4, 1.4), (1, 2, 1.4), (1, 3, 0.0), (2, 3, 0.4),
             (2, 4, -1.5), (3, 4, -0.5)]
    g = graph_of(5, edges)
    greedy = cluster(g, refine=False)
    refined = cluster(g)
    assert greedy.objective == pytest.approx(2.4)
    assert refined.objective == pytest.approx(3.2)
    assert groups(refined.labels) == {frozenset({0, 4}), frozenset({1, 2, 3})}
    assert objective(g, refined.labels) == refined.objective


def test_clustering_is_deterministic_and_recovers_planted_individuals():
    rng = random.Random(3)
    truth = [i // 5 for i in range(200)]  # 40 animals of 5 detections
    g = IdentityGraph(200)
    for i in range(200):
        for j in rng.sample(range(200), 8):
            if i != j:
                same = truth[i] == truth[j]
                p = rng.uniform(0.6, 0.95) if same else rng.uniform(0.02, 0.45)
                g.add_edge(i, j, math.log(p / (1 - p)))
    a, b = cluster(g), cluster(g)
    assert a.labels == b.labels
    correct = sum(1 for (i, j) in g.weights if (a.labels[i] == a.labels[j]) == (truth[i] == truth[j]))
    assert correct / len(g.weights) > 0.95


def test_plan_applies_confident_moves_and_defers_weak_ones():
    # individuals 7 {0}, 8 {1}, 9 {2}: 0-1 strongly one animal, 1-2 weakly
    g = graph_of(3, [(0, 1, STRONG), (1, 2, 1.0)])
    solved = cluster(g).labels
    assert len(set(solved)) == 1
    p = plan(g, [7, 8, 9], solved, threshold=math.log(0.8 / 0.2))
    assert p.target[0] == p.target[1]
    assert p.target[2] == 9  # evidence 1.0 + 0 < log(4): stays, and is asked
    assert [m.nodes for m in p.deferred] == [(2,)]
    assert p.merged == {8: 7} or p.merged == {7: 8}


def test_plan_never_moves_a_person_placed_detection_and_keeps_hard_rules():
    g = graph_of(3, [(0, 1, STRONG), (1, 2, STRONG)], cannot=[(0, 2)], anchors={2: 5})
    solved = cluster(g).labels
    p = plan(g, [4, 4, 5], solved, threshold=0.0)
    assert p.target[2] == 5
    assert p.target[0] != p.target[2]
    assert violations(g, p.target) == []


def test_plan_founds_an_individual_only_on_evidence_against_every_other():
    g = graph_of(3, [(0, 1, STRONG), (1, 2, -STRONG)])
    p = plan(g, [1, 1, None], cluster(g).labels, threshold=1.0)
    assert isinstance(p.target[2], NewIndividual)
    alone = graph_of(2, [])
    assert plan(alone, [1, None], cluster(alone).labels, threshold=1.0).target == [1, None]


def test_a_persons_same_moves_a_detection_whatever_the_machine_says():
    g = graph_of(2, [(0, 1, -STRONG)], must=[(0, 1)])
    p = plan(g, [1, 2], cluster(g).labels, threshold=10.0)
    assert p.target[0] == p.target[1]


def test_questions_rank_uncertainty_times_detections_moved_and_skip_what_was_asked():
    # individual A = {0,1,2,3} (one unit: a sighting), B = {4}, C = {5}
    g = graph_of(6, [(3, 4, 0.0), (3, 5, 0.0), (4, 5, -STRONG), (0, 5, -0.3)], must=[(0, 1), (1, 2), (2, 3)])
    labels = ["A", "A", "A", "A", "B", "C"]
    ranked = questions(g, labels, asked=set())
    assert [(q.a, q.b) for q in ranked][:1] == [(3, 4)]  # even odds, moves 1; A-C has evidence against
    assert ranked[0].kind == "merge" and ranked[0].flip == pytest.approx(0.5)
    assert (3, 4) not in {(q.a, q.b) for q in questions(g, labels, asked={(3, 4)})}
    assert all(q.priority == pytest.approx(q.flip * q.moves) for q in ranked)
    left = stopping(ranked)
    assert left["questions_left"] == sum(1 for q in ranked if q.flip >= 0.1)


def test_a_split_question_asks_about_the_weakest_member():
    g = graph_of(3, [(0, 1, STRONG), (1, 2, -0.2), (0, 2, 0.1)])
    ranked = questions(g, [1, 1, 1], asked=set())
    split = [q for q in ranked if q.kind == "split"]
    assert split and {split[0].a, split[0].b} & {2}
    assert split[0].flip == pytest.approx(1 - 1 / (1 + math.exp(0.1)), abs=1e-6)


def test_season_scale_clustering_is_fast_enough_to_measure():
    # 5,000 nodes, 10 edges each: the benchmark measures 35,000; this only shows it scales (no timing asserted)
    rng = np.random.default_rng(0)
    g = IdentityGraph(5000)
    for i in range(5000):
        for j in rng.integers(0, 5000, 10):
            g.add_edge(i, int(j), float(rng.normal(-1.0, 2.0)))
    result = cluster(g)
    assert violations(g, result.labels) == []
    assert result.objective >= 0


def test_refit_from_answers_learns_the_propertys_own_scale_and_reports_reliability():
    rng = np.random.default_rng(1)
    # the property's animals: same pairs score 0.55-0.75, different 0.35-0.6 (a scale the global fit misjudges)
    same = rng.random(120) < 0.4
    raw = np.where(same, rng.uniform(0.55, 0.75, 120), rng.uniform(0.35, 0.6, 120))
    prior = {"calibrations": {"body:m": {"x": [0.0, 0.9, 1.0], "y": [0.0, 0.05, 1.0], "prior": 0.01}},
             "weights": {"body:m": 1.0}, "intercept": 0.0, "aggregation": "best"}
    fitted = refit_from_answers({"body:m": raw}, same, prior, RefitRule(1, 40, 10), folds=5, seed=0)
    assert fitted["accepted"], fitted
    assert fitted["after"]["log_loss"] < fitted["before"]["log_loss"]
    assert set(fitted["fusion"]["calibrations"]) == {"body:m"}
    few = refit_from_answers({"body:m": raw[:10]}, same[:10], prior, RefitRule(1, 40, 10), folds=5, seed=0)
    assert not few["accepted"] and "answers" in few["why"]
    r = reliability(np.array([0.9, 0.1, 0.8]), np.array([True, False, False]))
    assert r["pairs"] == 3 and 0 < r["brier"] < 1


def _planted_pairs(rng, n, rate):
    """Pairs scored by two components: a body that separates animals weakly and a coat that separates them
    a little better."""
    same = rng.random(n) < rate
    body = np.where(same, rng.uniform(0.5, 0.9, n), rng.uniform(0.2, 0.7, n))
    coat = np.where(same, rng.uniform(0.4, 1.0, n), rng.uniform(0.0, 0.6, n))
    return {"body:m": body, "coat:c": coat}, same


def _fused(fusion, raw):
    model = FusionModel.from_artifact({"fusion": fusion, "version_id": "test"})
    return model.probability(model.calibrate(raw))


def test_a_refit_on_the_pairs_the_census_asked_keeps_the_unasked_pairs_as_unlikely_as_they_are():
    # the census asks the pairs its fused score ranks highest; the calibration in force is right but undersure
    # (half the log-odds' scale, shifted down). Refitting every component on that selected sample (`full`)
    # learns the body's calibration from pairs that were asked because their coat matched, and raises the
    # P(same) of the many pairs of different animals nobody asked about; a scale and a shift of the fused
    # log-odds (`scale`) is what such a sample can teach, and leaves them about where the truth has them.
    summed = {"truth": 0.0, "full": 0.0, "scale": 0.0}
    for seed in range(6):
        rng = np.random.default_rng(seed)
        calibrations, weights, intercept = fit_components(*_planted_pairs(rng, 3000, 0.05))
        truth = {"calibrations": calibrations, "weights": weights, "intercept": intercept, "aggregation": "best"}
        in_force = {**truth, "weights": {k: 0.5 * w for k, w in weights.items()}, "intercept": 0.5 * intercept - 1.5}
        raw, same = _planted_pairs(rng, 4000, 0.05)
        asked = np.argsort(-_fused(in_force, raw))[:300]
        unasked = np.setdiff1d(np.arange(same.size), asked)
        different = unasked[~same[unasked]]
        summed["truth"] += _fused(truth, raw)[different].sum()
        for form in ("full", "scale"):
            fitted = refit_from_answers({k: v[asked] for k, v in raw.items()}, same[asked], in_force,
                                        RefitRule(1, 30, 8, form))
            assert fitted["form"] == form and fitted["fusion"]["form"] == form
            summed[form] += _fused(fitted["fusion"], raw)[different].sum()
            if form == "scale":  # the fusion's order of the pairs and its calibrations are kept
                assert fitted["fusion"]["calibrations"] == in_force["calibrations"]
                before, after = _fused(in_force, raw), _fused(fitted["fusion"], raw)
                assert np.array_equal(np.argsort(before, kind="stable"), np.argsort(after, kind="stable"))
                assert fitted["fusion"]["rescaled"]["scale"] > 0
    assert summed["full"] > 3 * summed["truth"], summed
    assert 0.5 * summed["truth"] < summed["scale"] < 2 * summed["truth"], summed


def test_a_refit_rescales_only_a_calibration_in_force():
    rng = np.random.default_rng(2)
    raw, same = _planted_pairs(rng, 200, 0.3)
    with pytest.raises(ValueError):
        refit_from_answers(raw, same, None, RefitRule(1, 30, 8, "isotonic"))
    # nothing in force: nothing to rescale, so the components are fitted
    assert refit_from_answers(raw, same, None, RefitRule(1, 30, 8, "scale"))["form"] == "full"


def test_a_move_the_hard_rules_make_clash_moves_the_unit_that_stayed_too():
    # 0 (in review) belongs with P's 2 and 3; 1 is in P, of 0's frame, and weakly linked: it must leave P
    g = graph_of(4, [(0, 2, 6.0), (0, 3, 6.0), (1, 2, 0.5)], cannot=[(0, 1)])
    p = plan(g, [None, "P", "P", "P"], cluster(g).labels, threshold=2.0)
    assert p.target[0] == "P" and p.target[1] != "P"
    assert violations(g, p.target) == []


def test_a_persons_same_with_a_person_placed_detection_is_carried_out():
    g = graph_of(3, [], must=[(0, 1)], anchors={1: "Y", 2: "Y"})
    p = plan(g, [None, "Y", "Y"], cluster(g).labels, threshold=2.0)
    assert p.target == ["Y", "Y", "Y"] and not p.deferred


def test_contradicting_rules_drop_the_weaker_one_instead_of_stopping_the_census():
    # a person moved frame 1 of sighting {0, 1} to another individual: the sighting's must-link goes
    g = IdentityGraph(3, anchors={0: "X", 1: "Y"},
                      rules=[("cannot", 0, 2, "answer 7 (different)"), ("must", 0, 2, "answer 5 (same)"),
                             ("must", 0, 1, "sighting s")])
    assert g.resolve() == ["answer 5 (same)", "sighting s"]
    assert g.cannot == [(0, 2)] and g.must == []
    assert violations(g, cluster(g).labels) == []


def test_no_question_asks_to_merge_two_individuals_people_placed():
    g = graph_of(2, [(0, 1, 3.0)], anchors={0: "X", 1: "Y"})
    assert [q for q in questions(g, ["X", "Y"], asked=set()) if q.kind == "merge"] == []


def test_bridges_are_the_answers_nothing_else_corroborates():
    # a triangle of answers corroborates itself; the tail hanging off it, and two parallel answers, are told apart
    assert bridges([(1, 2), (2, 3), (3, 1), (3, 4)]) == {3}
    assert bridges([("a", "b"), ("a", "b")]) == set()
    assert bridges([(1, 2), (2, 3), (5, 6)]) == {0, 1, 2}
    assert bridges([(7, 7)]) == set()  # an answer inside one sighting joins nothing


def _snapshot(sightings, answers, edges=()):
    """A property's rows as `build_graph` reads them: one detection per entry of `sightings` (its sighting key),
    `answers` as (a, b, answer), `edges` as (a, b, P(same))."""
    nodes = [{"id": i, "individual_id": None, "state": "new", "decided_by": "fusion", "sighting": s,
              "image_sha256": f"frame{i}"} for i, s in enumerate(sightings)]
    return {"nodes": nodes, "answers": [{"id": k, "a": a, "b": b, "answer": x} for k, (a, b, x) in enumerate(answers)],
            "edges": [{"a": a, "b": b, "components": {}, "probability": p} for a, b, p in edges]}


def test_a_same_nothing_corroborates_is_asked_again_on_another_pair_and_a_different_there_undoes_it():
    # two sightings of two frames each; the machine thinks them unlikely one animal; a person says `same` (a slip)
    sightings = ["A", "A", "B", "B"]
    edges = [(0, 2, 0.05), (1, 3, 0.04), (0, 3, 0.02)]
    graph, *_ = build_graph(_snapshot(sightings, [(0, 2, "same")], edges), None)
    assert graph.unconfirmed == [(0, 2)]
    assert len({cluster(graph).labels[i] for i in range(4)}) == 1  # until verified, the answer holds
    asked = {(0, 2)}
    verify = verifications(graph, asked, reviewer_error=0.02)
    assert [(q.kind, {q.a, q.b}) for q in verify] == [("split", {1, 3})]  # the machine's likeliest other pair
    # a slip is likely where the machine saw little chance of a match: the question ranks high
    p = max(x for _, _, x in edges)  # the two sightings' strongest pair
    assert verify[0].flip == pytest.approx(0.02 * (1 - p) / (0.02 * (1 - p) + 0.98 * p))
    assert verify[0].flip > 0.2  # ten times the reviewer's error rate
    ranked = questions(graph, [7, 7, 7, 7], asked, reviewer_error=0.02)
    assert ranked and {ranked[0].a, ranked[0].b} == {1, 3}
    # the second answer says `different`: the uncorroborated `same` gives way, and the two are apart again
    graph, *_ = build_graph(_snapshot(sightings, [(0, 2, "same"), (1, 3, "different")], edges), None)
    labels = cluster(graph).labels
    assert labels[0] == labels[1] != labels[2] == labels[3]
    assert graph.dropped == ["answer 0 (same)"] and graph.unconfirmed == []


def test_a_second_same_corroborates_the_first_and_nothing_is_asked_again():
    sightings = ["A", "A", "B", "B"]
    edges = [(0, 2, 0.05), (1, 3, 0.04)]
    graph, *_ = build_graph(_snapshot(sightings, [(0, 2, "same"), (1, 3, "same")], edges), None)
    assert graph.unconfirmed == []
    assert verifications(graph, {(0, 2), (1, 3)}, reviewer_error=0.02) == []
    assert len(set(cluster(graph).labels)) == 1


def test_a_same_the_machine_agrees_with_is_hardly_worth_verifying():
    # P(same) 0.99 by the machine: a slip is then unlikely, below the questions' floor
    graph, *_ = build_graph(_snapshot(["A", "A", "B", "B"], [(0, 2, "same")], [(0, 2, 0.99), (1, 3, 0.99)]), None)
    (q,) = verifications(graph, {(0, 2)}, reviewer_error=0.02)
    assert q.flip < 0.01
    assert not [x for x in questions(graph, [1, 1, 1, 1], {(0, 2)}) if {x.a, x.b} == {1, 3}]


def test_single_photos_have_no_other_pair_to_verify_on():
    graph, *_ = build_graph(_snapshot([None, None], [(0, 1, "same")], [(0, 1, 0.1)]), None)
    assert graph.unconfirmed == [(0, 1)]
    assert verifications(graph, {(0, 1)}, reviewer_error=0.02) == []


def test_local_scaling_discounts_a_photo_that_looks_like_every_photo():
    # photos 0 and 1 are one animal (0.60); photo 4 is a hub: 0.65 to them, 0.80 to the others, 2 and 3
    sim = np.full((5, 5), 0.2)
    sim[0, 1] = sim[1, 0] = 0.60
    sim[4, :] = sim[:, 4] = 0.80
    sim[4, :2] = sim[:2, 4] = 0.65
    np.fill_diagonal(sim, 1.0)
    _, raw = hub_neighbours([(0, sim)], 5, keep=1, k=0)
    assert (0, 4) in raw and (0, 1) not in raw  # by raw similarity the hub is everyone's nearest
    r, scaled = hub_neighbours([(0, sim[:3]), (3, sim[3:])], 5, keep=1, k=2)  # two blocks: one pass, rows split
    assert (0, 1) in scaled and scaled[(0, 1)] == pytest.approx(0.60)  # edges keep the raw score
    assert r[4] == pytest.approx(0.80) and r[0] == pytest.approx((0.65 + 0.60) / 2)
    scale = LocalScale("body:x", {i: float(v) for i, v in enumerate(r)}, float(r.mean()))
    assert scale(0.60, 0, 1) > scale(0.65, 0, 4)  # the hub's pair loses what its neighbourhood gives every pair
    assert scale(0.5, 0, "elsewhere") == 0.5  # no r (another embedding version): the raw score
    # the graph reads the scaled body score: the hub pair's evidence falls below the true pair's
    model = FusionModel.from_artifact({"version_id": "t", "fusion": {
        "calibrations": {"body:x": {"x": [0.0, 1.0], "y": [0.0, 1.0], "prior": 0.1}},
        "weights": {"body:x": 1.0}, "intercept": 0.0}})
    snap = _snapshot([None] * 5, [])
    snap["edges"] = [{"a": 0, "b": 1, "components": {"body:x": 0.60}, "probability": None},
                     {"a": 0, "b": 4, "components": {"body:x": 0.65}, "probability": None}]
    plain, *_ = build_graph(snap, model)
    local, *_ = build_graph(snap, model, scale)
    assert plain.weights[(0, 4)] > plain.weights[(0, 1)] and local.weights[(0, 4)] < local.weights[(0, 1)]


def test_a_refit_must_win_by_more_than_its_noise_and_never_says_never():
    # a gain of 0.001 a pair with a spread of 0.1 is noise; a gain of 0.05 with the same spread is not
    rng = np.random.default_rng(0)
    spread = rng.normal(0, 0.1, 200)
    gain, noise = clear_gain(1.0 + spread, 1.0 + spread - 0.001 + rng.normal(0, 0.1, 200))
    assert gain < noise
    gain, noise = clear_gain(np.full(200, 1.0), np.full(200, 0.95) + rng.normal(0, 0.1, 200))
    assert gain > noise
    # the answers held no `same` below 0.6: the refit still leaves every pair some chance (1/(n+2))
    raw = np.linspace(0.3, 0.9, 100)
    same = raw > 0.6
    fitted = refit_from_answers({"body:m": raw}, same, None, RefitRule(1, 40, 10))
    assert min(fitted["fusion"]["calibrations"]["body:m"]["y"]) == pytest.approx(1 / 102, abs=1e-6)
    assert max(fitted["fusion"]["calibrations"]["body:m"]["y"]) == pytest.approx(101 / 102, abs=1e-6)
