"""`deer-reid train viewpoint`: the viewpoint classifier the pose service uses while no keypoint weights exist.

A body network's features of each crop and of its mirror image (`services.pose.viewpoint`), a
multinomial logistic head fitted on the training identities with every photo's mirror image added under
the mirrored label. Validation identities choose the regularisation and the confidence below which it
answers `unknown`; holdout identities, never seen by either, give the figures (and `deer-reid eval`
leaves every identity it learned or was selected on out of its own figures). Seconds, not an epoch loop.
"""
from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deer_reid.evaluation.dataset import DatasetError, Sample, load_dataset
from deer_reid.evaluation.features import pipeline_crop
from deer_reid.training import data
from services.pose.classifier import CARD_FILE, KIND, card_json, features_of, write_head
from services.pose.viewpoint import UNKNOWN, ViewpointHead, choose_threshold, mirrored_inputs, normalise_label
from shared.config import Settings
from shared.images import ImageRejected
from shared.models import REGISTRY, load_configured

REGULARISATION = (0.1, 1.0, 10.0, 100.0)  # logistic C, chosen on validation identities


@dataclass
class ViewpointConfig:
    name: str = "viewpoint"
    backbone: str = "efficientnet_lite0"
    seed: int = 0
    holdout_identities: int = 58  # the body training's defaults: the same seed holds out the same animals
    validation_identities: int = 15
    target_accuracy: float = 0.95  # answered predictions on validation identities; below: `unknown`
    overwrite: bool = False


def labelled(samples: list[Sample]) -> list[Sample]:
    return [s for s in samples if normalise_label(s.viewpoint) not in (None, UNKNOWN)]


def crop_features(samples: list[Sample], backbone, settings: Settings, progress: bool) -> tuple[np.ndarray, list, dict]:
    """The head's inputs for the samples' pipeline crops, in batches; the indexes read, and why others were not."""
    crops, keep, bad = [], [], {}
    for i, s in enumerate(samples):
        try:
            crops.append(pipeline_crop(s.path.read_bytes(), settings))
            keep.append(i)
        except (ImageRejected, OSError, ValueError) as exc:
            bad[str(s.path)] = str(exc)
    out = []
    for start in tqdm(range(0, len(crops), 32), desc="features", unit="batch", disable=not progress):
        out.append(features_of(backbone, crops[start:start + 32]))
    dim = 2 * backbone.spec.dim
    return (np.concatenate(out) if out else np.zeros((0, dim), np.float32)), keep, bad


def _head(fit, version: str, threshold: float) -> ViewpointHead:
    """sklearn's fit as a softmax head (a two-class fit is one logit: split it evenly between the classes)."""
    w, b = fit.coef_.astype(np.float32), fit.intercept_.astype(np.float32)
    if len(fit.classes_) == 2:
        w, b = np.concatenate([-w / 2, w / 2]), np.concatenate([-b / 2, b / 2])
    return ViewpointHead(tuple(str(c) for c in fit.classes_), w, b, threshold, version)


def report(head: ViewpointHead, x: np.ndarray, truth: list[str]) -> dict:
    """Accuracy of every photo (unknown counts as wrong), the share answered, accuracy of those answered,
    accuracy if it always answered its most likely class, and the confusion (truth -> answer -> count)."""
    answers = [v.label for v in head.viewpoints(x)]
    best = [head.classes[i] for i in head.probabilities(x).argmax(axis=1)] if len(x) else []
    answered = [(a, t) for a, t in zip(answers, truth) if a != UNKNOWN]
    confusion: dict[str, dict[str, int]] = {}
    for a, t in zip(answers, truth):
        confusion.setdefault(t, {}).setdefault(a, 0)
        confusion[t][a] += 1
    n = max(1, len(truth))
    return {"photos": len(truth), "accuracy": round(sum(a == t for a, t in zip(answers, truth)) / n, 4),
            "answered": round(len(answered) / n, 4),
            "accuracy_answered": round(sum(a == t for a, t in answered) / max(1, len(answered)), 4),
            "accuracy_without_unknown": round(sum(b == t for b, t in zip(best, truth)) / n, 4),
            "confusion": confusion}


def train_viewpoint(data_dir: Path, cfg: ViewpointConfig, settings: Settings, *, progress: bool = True) -> dict:
    from sklearn.linear_model import LogisticRegression

    started = time.monotonic()
    if not cfg.name or not all(c.isalnum() or c in "-_." for c in cfg.name) or cfg.name.startswith("."):
        raise DatasetError(f"--name {cfg.name!r} must be letters, digits, '-', '_' or '.'")
    if cfg.name in REGISTRY:
        raise DatasetError(f"--name {cfg.name!r} is a built-in model; choose another name")
    folder = Path(settings.model_cache) / cfg.name
    if (folder / CARD_FILE).exists() and not cfg.overwrite:
        raise DatasetError(f"model {cfg.name!r} exists in {folder}; --overwrite replaces it")
    samples = labelled(load_dataset(data_dir))
    classes = sorted({normalise_label(s.viewpoint) for s in samples})
    if len(classes) < 2:
        raise DatasetError(f"{data_dir}/metadata.csv needs a viewpoint column with at least two values "
                           f"(found {classes or 'none'})")
    parts = data.split(samples, holdout=cfg.holdout_identities, validation=cfg.validation_identities, seed=cfg.seed)
    backbone = load_configured(cfg.backbone, settings, allow_random=False)
    if backbone.random_weights:
        raise DatasetError(f"backbone {cfg.backbone} has no weights in {settings.model_cache}")

    def part(samples_of_part):
        x, keep, bad = crop_features(samples_of_part, backbone, settings, progress)
        return x, [normalise_label(samples_of_part[i].viewpoint) for i in keep], bad

    x_train, y_train, bad = part(parts.train)
    x_val, y_val, bad_val = part(parts.validation)
    x_hold, y_hold, bad_hold = part(parts.holdout)
    xt, yt = mirrored_inputs(x_train, y_train)
    xv, yv = mirrored_inputs(x_val, y_val)

    fits = {}
    for c in REGULARISATION:
        fit = LogisticRegression(C=c, max_iter=5000).fit(xt, yt)
        fits[c] = (float(np.mean(fit.predict(xv) == np.asarray(yv))), fit)
    chosen_c = max(REGULARISATION, key=lambda c: (fits[c][0], -c))  # ties: the stronger regularisation
    fit = fits[chosen_c][1]
    probe = _head(fit, "probe", 0.0)
    threshold = choose_threshold(probe.probabilities(xv), [probe.classes.index(y) for y in yv], cfg.target_accuracy)
    head = _head(fit, "", threshold)
    checksum = write_head(folder, head)
    card = {
        "kind": KIND, "name": cfg.name, "backbone": cfg.backbone, "backbone_version": backbone.version,
        "classes": list(head.classes), "threshold": threshold, "head_file": "head.npz", "head_sha256": checksum,
        "features": "[f(crop) - f(mirror), f(crop) + f(mirror)] of the backbone's pooled features",
        "regularisation": {"chosen_C": chosen_c,
                           "validation_accuracy_by_C": {str(c): round(fits[c][0], 4) for c in REGULARISATION}},
        "target_accuracy_answered": cfg.target_accuracy,
        "identities": {"train": parts.identities("train"), "validation": parts.identities("validation"),
                       "holdout": parts.identities("holdout"), "skipped": parts.skipped},
        "photos": {"train": len(y_train), "validation": len(y_val), "holdout": len(y_hold)},
        "validation": report(head, x_val, y_val),
        "holdout": report(head, x_hold, y_hold),
        "unreadable_images": {**bad, **bad_val, **bad_hold},
        "data": {"folder": str(Path(data_dir).resolve())},
        "hyper_parameters": {k: v for k, v in asdict(cfg).items() if k not in ("name", "overwrite")},
        "created_at": datetime.now(timezone.utc).isoformat(),
        "machine": platform.processor() or platform.machine(),
        "seconds": round(time.monotonic() - started, 1),
    }
    (folder / CARD_FILE).write_text(card_json(card))
    return card


def summary(card: dict) -> str:
    return json.dumps({k: card[k] for k in ("name", "classes", "threshold", "validation", "holdout", "seconds")},
                      indent=2)
