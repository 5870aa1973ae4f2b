"""The pose service's viewpoint on labelled photos: its accuracy where the data has viewpoints, and the
predicted viewpoints the pose-aware component compares on (`shared.components.pose`)."""
from __future__ import annotations

from typing import Sequence

from deer_reid.evaluation.dataset import Sample
from deer_reid.training.viewpoint import crop_features, report
from services.pose.classifier import ViewpointClassifier
from services.pose.viewpoint import UNKNOWN, normalise_label
from shared.config import Settings


def predicted_viewpoints(samples: Sequence[Sample], name: str, settings: Settings, learned: set[str], *,
                         progress: bool = True) -> tuple[list[str], dict]:
    """The classifier's viewpoint of every photo (as the pose service answers without keypoints), and
    notes: the classifier's version, its accuracy against the labels where the data has them, on the
    identities it never `learned` (trained or selected on) only."""
    classifier = ViewpointClassifier(name, settings.model_cache, device=settings.device, precision=settings.precision,
                                     engine=settings.inference_engine)
    x, keep, _ = crop_features(list(samples), classifier.backbone, settings, progress)
    views = [UNKNOWN] * len(samples)  # an unreadable photo has no viewpoint
    for i, v in zip(keep, classifier.head.viewpoints(x)):
        views[i] = v.label
    notes = {"classifier": classifier.version, "backbone": classifier.card["backbone_version"],
             "threshold": classifier.head.threshold,
             "predicted": {v: views.count(v) for v in sorted(set(views))}}
    row = {i: n for n, i in enumerate(keep)}  # sample index -> its row of x
    labelled = [i for i in keep if normalise_label(samples[i].viewpoint) and samples[i].identity not in learned]
    if labelled:
        notes["accuracy_identities"] = len({samples[i].identity for i in labelled})
        notes["accuracy_against_labels"] = report(classifier.head, x[[row[i] for i in labelled]],
                                                  [normalise_label(samples[i].viewpoint) for i in labelled])
    return views, notes
