"""`eval --protocol census --offline`: the census's own rules without the stack, on planted animals (pure) and on
real photos through the command line."""
from __future__ import annotations

import json

import numpy as np

from deer_reid.evaluation.census_offline import graph_ceiling, graph_edges, simulate
from shared.census.refit import RefitRule
from tests.conftest import labelled_subset

BODY = "body:test"


def planted(animals: int, sightings: int, photos: int, seed: int = 0, same=(0.70, 0.85), other=(0.55, 0.75)):
    """Body similarities of planted animals in upload order (sightings shuffled): the same animal's photos
    drawn from `same`, two animals' from `other` (they overlap: weak evidence)."""
    rng = np.random.default_rng(seed)
    units = [(a, s) for a in range(animals) for s in range(sightings)]
    units = [units[i] for i in rng.permutation(len(units))]
    identities = [str(a) for a, s in units for _ in range(photos)]
    keys = [f"{a}/{s}" for a, s in units for _ in range(photos)]
    n = len(identities)
    sim = np.where(np.equal.outer(identities, identities), rng.uniform(*same, (n, n)), rng.uniform(*other, (n, n)))
    sim = np.triu(sim, 1) + np.triu(sim, 1).T + np.eye(n)
    return sim, identities, keys


def model(top: float) -> dict:
    """The fusion section of the body alone, calibrated so that the best pairs reach P(same) `top`."""
    return {"calibrations": {BODY: {"x": [0.5, 0.7, 0.9], "y": [0.01, 0.05, top], "prior": 0.05}},
            "weights": {BODY: 1.0}, "intercept": 0.0}


def test_graph_edges_join_each_photo_to_its_closest_earlier_ones_and_nearest_overall():
    sim = np.array([[1, .9, .1, .2], [.9, 1, .3, .8], [.1, .3, 1, .4], [.2, .8, .4, 1]])
    assert graph_edges(sim, neighbours=1, fusion_candidates=1)[0] == [(0, 1), (1, 2), (1, 3), (2, 3)]
    assert graph_edges(sim, neighbours=0, fusion_candidates=0)[0] == []
    # fusion re-orders its body candidates by the fused P(same): photo 3's top candidate becomes 2, not 1,
    # but never a photo beyond the body's candidates_k
    fused = np.array([[1, .1, .1, .1], [.1, 1, .1, .2], [.1, .1, 1, .9], [.1, .2, .9, 1]])
    assert graph_edges(sim, 0, 1, fused=fused)[0] == [(0, 1), (1, 2), (2, 3)]  # 2: a tie, the body decides
    assert graph_edges(sim, 0, 1, fused=fused, candidates_k=1)[0] == [(0, 1), (1, 2), (1, 3)]


def test_the_graphs_ceiling_joins_only_what_its_edges_reach():
    # animals a (photos 0, 1, 2; 0 and 1 one sighting) and b (3, 4); the graph reaches 2 from 1 and joins 3 to a
    identities, sightings = ["a", "a", "a", "b", "b"], ["a/1", "a/1", "a/2", "b/1", "b/2"]
    ceiling = graph_ceiling([(1, 2), (2, 3)], identities, sightings)
    assert ceiling["predicted_individuals"] == 3 and ceiling["same_answers"] == 1  # b's two sightings never meet
    assert ceiling["bcubed_precision"] == 1.0 and ceiling["bcubed_recall"] < 1.0
    assert (ceiling["edges"], ceiling["edges_one_animal"]) == (2, 1)
    whole = graph_ceiling([(1, 2), (3, 4), (0, 4)], identities, sightings)
    assert whole["bcubed_f1"] == 1.0 and whole["same_answers"] == 2 and whole["predicted_individuals"] == 2


def test_with_weak_evidence_the_answers_build_the_census_and_with_strong_evidence_the_machine_does():
    sim, identities, keys = planted(animals=5, sightings=3, photos=2)
    curve, tally = simulate({BODY: sim}, model(0.3), BODY, identities, keys, budget=300, reviewer_error=0.0,
                            recluster_every=5, neighbours=6)
    online = tally["online"]
    assert online["predicted_individuals"] == 15 and online["bcubed_precision"] == 1.0
    assert curve[0]["bcubed_f1"] == online["bcubed_f1"]  # no pair reaches P(same) 0.5: nothing moves unasked
    assert curve[-1]["bcubed_f1"] == 1.0 and curve[-1]["predicted_individuals"] == 5, curve[-1]
    assert tally["same"] >= 15 - 5  # each `same` joins two sightings at most
    assert all(p["bcubed_precision"] == 1.0 for p in curve)  # a right reviewer never joins two animals
    assert [p["answers"] for p in curve] == sorted(p["answers"] for p in curve)

    curve, tally = simulate({BODY: sim}, model(0.99), BODY, identities, keys, budget=300, reviewer_error=0.0,
                            recluster_every=5, neighbours=6)
    assert curve[0]["bcubed_f1"] > tally["online"]["bcubed_f1"]  # the re-solve alone merges on strong evidence


def test_eval_census_offline_on_real_photos(tmp_path, nyala_rows, nyala_paths, capsys):
    from deer_reid.cli import main

    data = labelled_subset(tmp_path / "data", nyala_rows, nyala_paths, 8, 6)
    out = tmp_path / "census.json"
    assert main(["eval", str(data), "--protocol", "census", "--offline", "--budget", "40", "--recluster-every", "5",
                 "--json", str(out), "--report", str(tmp_path / "report"), "--quiet"]) == 0
    result = json.loads(out.read_text())
    assert result["offline"] is True and result["baseline"] is None and "stack" in result["baseline_why"]
    assert result["true_individuals"] == 4  # the half of the 8 identities the calibration was not fitted on
    assert result["sightings"] <= result["images"] == 24
    assert result["online"]["predicted_individuals"] == result["sightings"]
    answers = [p["answers"] for p in result["curve"]]
    assert answers[0] == 0 and answers == sorted(answers) and answers[-1] <= 40
    assert {"answers_to_f1_90", "answers_to_f1_95", "tally"} <= set(result)
    ceiling = result["graph_ceiling"]  # what the answers could reach on that graph at best
    assert ceiling["bcubed_f1"] >= max(p["bcubed_f1"] for p in result["curve"]) - 0.05  # a wrong answer may join more
    assert ceiling["bcubed_precision"] == 1.0 and ceiling["same_answers"] <= result["sightings"] - 1
    floor = result["answers_floor"]  # people joining every sighting need at least this many answers
    assert 0 < floor["f1_90"] <= floor["f1_95"] <= result["sightings"] - result["true_individuals"]
    assert floor["per_sighting_f1_95"] == round(floor["f1_95"] / result["sightings"], 3)
    # no run joins more with fewer answers unless the machine joined some itself (re-solves, wrong answers)
    reached = result["answers_to_f1_90"]
    assert reached is None or reached >= floor["f1_90"] or result["reclustered_before_answers"]["bcubed_recall"] > \
        result["online"]["bcubed_recall"]
    assert (tmp_path / "report" / "census.png").stat().st_size > 1000
    assert "Census with people in the loop" in (tmp_path / "report" / "report.md").read_text()
    assert "the graph's ceiling" in (tmp_path / "report" / "report.md").read_text()
    assert "the floor (people join every sighting" in (tmp_path / "report" / "report.md").read_text()


def test_eval_census_offline_with_the_coat_fits_and_carries_its_components(tmp_path, nyala_rows, nyala_paths):
    from deer_reid.evaluation.census_offline import run_census_offline
    from shared.config import Settings

    data = labelled_subset(tmp_path / "data", nyala_rows, nyala_paths, 6, 4)
    result = run_census_offline(data, body_model=None, limit=None, seed=1, budget=10, reviewer_error=0.0,
                                recluster_every=5, settings=Settings(), report_dir=None, json_path=None,
                                progress=False, coat=True)
    assert result["mode"] == "enhanced"
    weights = result["calibration_fitted_on"]["weights"]
    assert "body:efficientnet_lite0" in weights and {"coat:colour", "coat:markings"} <= set(weights), weights
    assert result["curve"][0]["answers"] == 0 and result["true_individuals"] == 3


def test_the_calibration_is_refitted_from_the_answers_as_the_census_job_refits_it():
    # a calibration that undersells the evidence (the best pairs at P(same) 0.3): the answers show it, and the
    # refit the census job would install takes over once it beats the one in force out of sample
    sim, identities, keys = planted(animals=6, sightings=4, photos=2, seed=3)
    rule = RefitRule(every=10, min_answers=30, min_each=8)
    curve, tally = simulate({BODY: sim}, model(0.3), BODY, identities, keys, budget=200, reviewer_error=0.0,
                            recluster_every=10, neighbours=6, refit=rule)
    assert tally["refits"], tally
    first = tally["refits"][0]
    assert first["pairs"] >= 30 and first["after"]["log_loss"] < first["before"]["log_loss"]
    _, never = simulate({BODY: sim}, model(0.3), BODY, identities, keys, budget=200, reviewer_error=0.0,
                        recluster_every=10, neighbours=6)
    assert never["refits"] == []
