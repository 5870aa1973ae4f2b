"""The pose service's viewpoint on labelled photos: its accuracy where the data has viewpoints, and the
predicted viewpoints the pose-aware component compares on (`services.fusion.components.pose`)."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from tqdm import tqdm

from deer_reid.evaluation.dataset import Sample
from deer_reid.evaluation.features import pipeline_crop
from deer_reid.training.viewpoint import report
from services.pose.classifier import ViewpointClassifier
from services.pose.viewpoint import normalise_label
from shared.config import Settings


def predicted_viewpoints(samples: Sequence[Sample], name: str, settings: Settings, learned: set[str], *,
                         progress: bool = True) -> tuple[list[str], dict]:
    """The classifier's viewpoint of every photo (as the pose service answers without keypoints), and
    notes: the classifier's version, its accuracy against the labels where the data has them, on the
    identities it never `learned` (trained or selected on) only."""
    classifier = ViewpointClassifier(name, settings.model_cache, device=settings.device, precision=settings.precision)
    crops = [pipeline_crop(s.path.read_bytes(), settings) for s in samples]
    x = np.concatenate([classifier.features(crops[i:i + 32])
                        for i in tqdm(range(0, len(crops), 32), desc="viewpoint", unit="batch", disable=not progress)])
    views = [v.label for v in classifier.head.viewpoints(x)]
    notes = {"classifier": classifier.version, "backbone": classifier.card["backbone_version"],
             "threshold": classifier.head.threshold,
             "predicted": {v: views.count(v) for v in sorted(set(views))}}
    labelled = [i for i, s in enumerate(samples) if normalise_label(s.viewpoint) and s.identity not in learned]
    if labelled:
        notes["accuracy_identities"] = len({samples[i].identity for i in labelled})
        notes["accuracy_against_labels"] = report(classifier.head, x[labelled],
                                                  [normalise_label(samples[i].viewpoint) for i in labelled])
    return views, notes
