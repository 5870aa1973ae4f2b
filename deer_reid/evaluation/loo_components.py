"""The loo protocol's first stage: every component fusion would run, scored every photo against every photo.

Each component is scored through `shared.components`, by fusion's own scorers. The coat's components are
scored against each photo's body shortlist, as fusion draws it, and so twice: with the shortlists drawn
within the whole run (for the figures on every identity), and drawn within each half of the identities
(for the fit and the ablation, where each half is a gallery of its own).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from deer_reid.evaluation import calibration as cal
from deer_reid.evaluation.antler import WHEN, antler_features, notes
from deer_reid.evaluation.coat import coat_features, coat_matrices, coat_version, extraction_ms, service_variants, \
    coat_shortlists
from deer_reid.evaluation.dataset import Sample
from deer_reid.evaluation.features import embed_samples
from deer_reid.evaluation.pose import predicted_viewpoints
from shared.components import body_component, component
from shared.components.antler import ANTLER, Archived
from shared.components.pose import POSE, Seen
from shared.config import Settings
from shared.models import LoadedModel
from shared.schemas import sex_of


@dataclass(frozen=True)
class Photos:
    """The run's photos and the labels every stage reads; a photo's index addresses the similarity matrices."""
    samples: list[Sample]
    identities: list[str]
    encounters: list[str]
    sexes: list[str]
    viewpoints: list[str] | None  # only when every photo's viewpoint is labelled

    @classmethod
    def of(cls, samples: list[Sample]) -> Photos:
        return cls(samples, [s.identity for s in samples], [s.encounter for s in samples],
                   [sex_of(s.cls) for s in samples],
                   [s.viewpoint for s in samples] if all(s.viewpoint for s in samples) else None)


class Split(NamedTuple):
    """The identities the fusion is fitted on, those every fitted figure is reported on, and their photos."""
    fit_ids: set[str]
    held_ids: set[str]
    fit: list[int]
    held: list[int]


def split_by_identity(photos: Photos, seed: int) -> Split:
    fit_ids, held_ids = cal.split_identities(photos.identities, seed)
    return Split(fit_ids, held_ids, [i for i, x in enumerate(photos.identities) if x in fit_ids],
                 [i for i, x in enumerate(photos.identities) if x in held_ids])


@dataclass(frozen=True)
class BodyNetworks:
    """The body networks' embeddings of every photo. The first network plays the fast model's part: fusion
    draws the coat shortlists, compares poses and chooses exemplars by its similarity."""
    names: list[str]
    embeddings: dict[str, np.ndarray]
    models: list[LoadedModel]

    @property
    def fast(self) -> np.ndarray:
        return self.embeddings[self.names[0]]


def embed(photos: Photos, names: list[str], settings: Settings, *, allow_random: bool,
          progress: bool) -> BodyNetworks:
    embeddings, models = embed_samples(photos.samples, names, settings, allow_random=allow_random, progress=progress)
    return BodyNetworks(names, embeddings, models)


def all_pairs(name: str, items: list) -> np.ndarray:
    """Component `name`'s (N, N) scores of every photo against every photo (the service scores one query)."""
    return component(name).similarity(items, items)


class CoatScores(NamedTuple):
    whole_run: dict[str, np.ndarray]
    within_halves: dict[str, np.ndarray]
    uncascaded: dict[str, np.ndarray] | None  # the same without the cascade (None: no cascade narrows anything)
    pattern_variants: dict[str, np.ndarray]  # every pattern matcher's scores by variant, within the halves
    service: dict[str, str]  # the variants the coat service runs -> the component each serves as
    shortlist: int
    notes: dict
    version: str


def _facing_agreement(feats: list[dict], samples: list[Sample]) -> dict | None:
    """How often the coat service's facing (from the silhouette) agrees with labelled left/right viewpoints."""
    pairs = [(f["attributes"].get("facing"), s.viewpoint) for f, s in zip(feats, samples)
             if s.viewpoint in ("left", "right") and f["attributes"].get("facing")]
    if not pairs:
        return None
    return {"photos": len(pairs), "agree": round(sum(a == b for a, b in pairs) / len(pairs), 3)}


def coat_scores(photos: Photos, split: Split, body: np.ndarray, settings: Settings, shortlist: int | None, *,
                progress: bool) -> CoatScores:
    """The coat service's extractor on every photo; its components matched against each photo's body
    shortlist (the gallery photos the fast body model finds closest), the other pattern matchers beside."""
    feats = coat_features(photos.samples, settings, progress=progress)
    started = time.monotonic()
    service = service_variants(settings)
    shortlist = shortlist or settings.coat_shortlist
    matching = min(shortlist, settings.coat_pattern_shortlist)  # the keypoint matchers' part of it
    cascade = settings.coat_cascade_shortlist
    # Over the whole run only the service's patterns are needed (the all-identity rows).
    drawn = coat_shortlists(body, photos.encounters, settings, shortlist)
    whole_run, _, matched = coat_matrices(feats, drawn.mask, service, variants=(), pattern_mask=drawn.pattern_mask,
                                          cascade=cascade, ranked=drawn.ranked)
    # Each half is a gallery of its own (fitted on, or reported on), and fusion shortlists among the gallery
    # it searches: drawn again within each half, the reported half's photos are not each given a shortlist
    # half spent on the other half. Pairs matched above are not matched again.
    drawn = coat_shortlists(body, photos.encounters, settings, shortlist, [split.fit, split.held])
    within_halves, variants, matched = coat_matrices(feats, drawn.mask, service, matched,
                                                     pattern_mask=drawn.pattern_mask, cascade=cascade,
                                                     ranked=drawn.ranked)
    # the cascade's yardstick: every keypoint matcher over its whole pattern shortlist (no pair matched again)
    uncascaded = coat_matrices(feats, drawn.mask, service, matched, variants=(),
                               pattern_mask=drawn.pattern_mask)[0] if 0 < cascade < matching else None
    return CoatScores(whole_run, within_halves, uncascaded, variants, service, shortlist, {
        "shortlist": shortlist, "pattern_shortlist": matching, "cascade_shortlist": cascade,
        "pattern_components": service,
        "extraction_ms_median": extraction_ms(feats),
        "matching_s_all_variants": round(time.monotonic() - started, 1),
        "flags": {f: sum(f in x["flags"] for x in feats) for f in sorted({f for x in feats for f in x["flags"]})},
        "facing_vs_viewpoint": _facing_agreement(feats, photos.samples),
        "shortlist_drawn": "within the whole run for the all-identity rows, within each half after"},
        coat_version(settings))


class AntlerScores(NamedTuple):
    fingerprint: np.ndarray  # fusion's antler component
    variants: dict[str, np.ndarray]  # other ways of scoring the region, measured alone in the ablation
    notes: dict
    version: str


def antler_scores(photos: Photos, settings: Settings, *, ignore_cut: bool, male_notes: dict,
                  progress: bool) -> AntlerScores:
    """The antler service's fingerprint of every photo, scored by fusion's antler component.

    The service's rule: a rack running into the photo's top edge gives no fingerprint. Nyala's photos are
    crops of the animal, so `ignore_cut` measures the fingerprint as if the boxes lay inside the frame."""
    feats, version = antler_features(photos.samples, settings, progress=progress)

    def scored(key: str) -> np.ndarray:
        return all_pairs(ANTLER, [Archived(WHEN.isoformat(), None, f[key] is not None, version, f[key], WHEN)
                                  for f in feats])
    fingerprint = scored("fingerprint_uncut" if ignore_cut else "fingerprint")
    variants = {"antler: full region embedding, no projection": scored("full"),
                "antler: fingerprint with the cut-by-frame rule off": scored("fingerprint_uncut")}
    return AntlerScores(fingerprint, variants, {**male_notes, "cut_by_frame_rule": "off" if ignore_cut else "on",
                                                **notes(feats, photos.identities, fingerprint),
                                                "fingerprint_version": version}, version)


def viewpoint_scores(photos: Photos, body: BodyNetworks, classifier: str, card: dict, settings: Settings, *,
                     pose: bool, progress: bool) -> tuple[np.ndarray | None, dict]:
    """The pose service's viewpoint classifier on every photo (measured on the identities it never learned)
    and, with `pose`, the pose component as fusion compares: the fast model's similarity, exemplars of the
    query's own viewpoint only."""
    learned = set(card["identities"]["train"]) | set(card["identities"]["validation"])
    predicted, viewpoint_notes = predicted_viewpoints(photos.samples, classifier, settings, learned,
                                                      progress=progress)
    if not pose:
        return None, viewpoint_notes
    viewpoint_notes["component"] = ("pose: the body similarity to photos of the same predicted viewpoint "
                                    "(no evidence where either is unknown)")
    return all_pairs(POSE, [Seen(v, e) for v, e in zip(predicted, body.fast)]), viewpoint_notes


@dataclass(frozen=True)
class Components:
    """Every component's (N, N) scores, in the order fusion's artifact lists them."""
    whole_run: dict[str, np.ndarray]  # coat shortlists drawn within the whole run: the all-identity figures
    within_halves: dict[str, np.ndarray]  # coat shortlists drawn within each half: the fit and the ablation
    coat: CoatScores | None
    antler: AntlerScores | None
    viewpoint_notes: dict


def score_components(photos: Photos, split: Split, body: BodyNetworks, settings: Settings, *, coat: bool,
                     coat_shortlist: int | None, antler: bool, antler_ignore_cut: bool, male_notes: dict,
                     pose: bool, viewpoint_classifier: str, viewpoint_card: dict | None,
                     progress: bool) -> Components:
    """One component per body network, then those the flags add: coat, antler, pose. The viewpoint
    classifier is measured wherever its card is given, and compared on with `pose` only."""
    scores = {body_component(n): all_pairs(body_component(n), list(body.embeddings[n])) for n in body.names}
    coat_found = coat_scores(photos, split, scores[body_component(body.names[0])], settings, coat_shortlist,
                             progress=progress) if coat else None
    if coat_found is not None:
        scores.update(coat_found.whole_run)
    antler_found = antler_scores(photos, settings, ignore_cut=antler_ignore_cut, male_notes=male_notes,
                                 progress=progress) if antler else None
    if antler_found is not None:
        scores[ANTLER] = antler_found.fingerprint
    pose_scores, viewpoint_notes = None, {}
    if viewpoint_card is not None:
        pose_scores, viewpoint_notes = viewpoint_scores(photos, body, viewpoint_classifier, viewpoint_card,
                                                        settings, pose=pose, progress=progress)
    if pose_scores is not None:
        scores[POSE] = pose_scores
    # the coat's half-drawn scores replace its whole-run ones: the same components in the same order
    within_halves = {**scores, **(coat_found.within_halves if coat_found is not None else {})}
    return Components(scores, within_halves, coat_found, antler_found, viewpoint_notes)
