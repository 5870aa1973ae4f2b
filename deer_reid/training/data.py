"""Training data: identity-disjoint splits, classes, the pipeline's own crops, identity-keeping augmentation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from deer_reid.evaluation.dataset import DatasetError, Sample, identities_in_seeded_order

# Viewpoint labels a training folder may use; flanks of a striped animal carry different patterns,
# so identity x viewpoint is the class where a viewpoint is given.
VIEWPOINTS = {"left", "right", "front", "back", "frontal", "rear", "profile-left", "profile-right", "angled",
              "top", "unknown"}


@dataclass
class Split:
    train: list[Sample]
    validation: list[Sample]  # identities held out of training, used to choose the epoch
    holdout: list[Sample]  # identities never seen by training or selection: the figures come from these
    skipped: dict[str, str] = field(default_factory=dict)  # identity -> why it was left out of training

    def identities(self, part: str) -> list[str]:
        return sorted({s.identity for s in getattr(self, part)})


def check_viewpoints(samples: Sequence[Sample]) -> None:
    bad = sorted({s.viewpoint for s in samples if s.viewpoint and s.viewpoint.lower() not in VIEWPOINTS})
    if bad:
        raise DatasetError(f"viewpoint values {bad[:5]} are not known; use one of {sorted(VIEWPOINTS)} (or leave "
                           "the cell empty)")


def split(samples: Sequence[Sample], *, holdout: int, validation: int, seed: int) -> Split:
    """Seeded, identity-disjoint: `holdout` identities for the final figures, `validation` for choosing the
    epoch, the rest for training. Identities with a single photo teach nothing about how one animal varies:
    they are left out of training (they may still be held out, as distractors)."""
    by_id = identities_in_seeded_order(samples, seed)
    order = list(by_id)
    held, val, rest = order[:holdout], order[holdout:holdout + validation], order[holdout + validation:]
    skipped = {n: "one photo only" for n in rest if len(by_id[n]) < 2}
    train_ids = [n for n in rest if n not in skipped]
    if len(train_ids) < 2:
        raise DatasetError(f"{len(train_ids)} identities with two or more photos are left for training after "
                           f"holding out {len(held)} and validating on {len(val)}: at least 2 are needed")
    if validation and not any(len(by_id[n]) >= 2 for n in val):
        raise DatasetError("no validation identity has two photos: nothing to validate on")

    def pick(ids):
        return [s for n in ids for s in by_id[n]]

    return Split(pick(train_ids), pick(val), pick(held), skipped)


def folds(samples: Sequence[Sample], k: int, seed: int) -> list[tuple[list[Sample], list[Sample]]]:
    """K identity-disjoint (training, validation) pairs over `samples`, each identity validated on once:
    cross-validation for choosing the epoch when a single validation split is too few animals to tell
    epochs apart, after which every identity can be trained on. Identities are dealt round-robin in a
    seeded order, largest first, so the folds hold about as many photos as identities."""
    by_id = identities_in_seeded_order(samples, seed)
    if k < 2 or k > len(by_id):
        raise DatasetError(f"{k} folds need 2 to {len(by_id)} (the training identities) folds")
    ordered = sorted(by_id, key=lambda n: -len(by_id[n]))  # stable: ties keep the seeded order
    dealt = [ordered[i::k] for i in range(k)]
    return [([s for j, ids in enumerate(dealt) if j != i for n in ids for s in by_id[n]],
             [s for n in ids for s in by_id[n]]) for i, ids in enumerate(dealt)]


def class_labels(samples: Sequence[Sample], by_viewpoint: bool) -> tuple[np.ndarray, list[str]]:
    """Class index per sample: identity, or identity x viewpoint."""
    keys = [f"{s.identity}|{(s.viewpoint or 'unknown').lower()}" if by_viewpoint else s.identity for s in samples]
    names = sorted(set(keys))
    index = {k: i for i, k in enumerate(names)}
    return np.asarray([index[k] for k in keys], dtype=np.int64), names


def augment(batch, size: int, generator, erase: float = 0.0):
    """Identity-keeping augmentation of a uint8 (N, 3, H, W) batch: a crop of 70-100% of the frame
    (the detector's box is loose anyway), brightness/contrast/saturation (light and camera differ), a
    small rotation. No horizontal flip: the two flanks of a striped animal are different patterns. With
    `erase` > 0, that share of images also gets one rectangle (2-33% of the area) of noise: grass, a branch
    or another animal hides part of an animal in trail-camera frames, and a network that must find the
    identity in what is left cannot lean on one patch of the coat (random erasing, Zhong et al. 2020)."""
    import torch
    from torchvision.transforms.v2 import functional as TF

    out = []
    n, _, h, w = batch.shape
    for i in range(n):
        r = torch.rand(7, generator=generator)
        scale = 0.7 + 0.3 * r[0].item()
        ch, cw = int(h * scale), int(w * scale)
        top, left = int((h - ch) * r[1].item()), int((w - cw) * r[2].item())
        img = TF.resized_crop(batch[i], top, left, ch, cw, [size, size], antialias=True)
        img = TF.adjust_brightness(img, 0.75 + 0.5 * r[3].item())
        img = TF.adjust_contrast(img, 0.75 + 0.5 * r[4].item())
        img = TF.adjust_saturation(img, 0.7 + 0.6 * r[5].item())
        img = TF.rotate(img, float(-8 + 16 * r[6].item()))
        if erase > 0:  # drawn only when asked: runs without erasing keep their random stream
            e = torch.rand(5, generator=generator)
            if e[0].item() < erase:
                area = (0.02 + 0.31 * e[1].item()) * size * size
                aspect = float(np.exp(np.log(0.3) + (np.log(3.3) - np.log(0.3)) * e[2].item()))
                eh = min(size, max(1, int(round((area * aspect) ** 0.5))))
                ew = min(size, max(1, int(round((area / aspect) ** 0.5))))
                y, x = int((size - eh) * e[3].item()), int((size - ew) * e[4].item())
                img = img.clone()
                img[:, y:y + eh, x:x + ew] = torch.randint(0, 256, (3, eh, ew), generator=generator,
                                                           dtype=torch.uint8)
        out.append(img)
    return torch.stack(out)
