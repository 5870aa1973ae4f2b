"""Local scaling of body similarities for the census: a photo that looks like every photo is no evidence.

Nearest-neighbour search in a high-dimensional embedding has hubs: photos (a plain flank, a common pose,
the same light) that come close to many others, whoever the animal. On nyala's held-out half with the
ImageNet body network, of the 50 pairs of sightings the body found most alike, 1 was one animal; of each
sighting's own nearest, 9% were. A census that asks about the pairs with the highest calibrated P(same)
therefore asks about hubs. CSLS (cross-domain similarity local scaling, Conneau, Lample, Ranzato, Denoyer
and Jegou, "Word translation without parallel data", ICLR 2018) discounts each photo's similarity by how
close its neighbourhood is: r(x) is x's mean similarity to its k nearest photos of the property, and a pair
counts as

    s(x, y) - (r(x) + r(y)) / 2 + mean r

The last term keeps the scale of the raw similarity on average, so the calibration fitted on raw scores
(shared with fusion, and refitted from the property's answers on raw scores) still reads it: a pair of
ordinary photos keeps its score, a hub's pairs lose what its neighbourhood gives every pair, a loner's
gain. Measured with `eval --protocol census --offline` on nyala's held-out half: see the README.

The census job computes r over the property's detections on every run (the neighbour search it does anyway)
and applies it to every edge's body score when it builds the graph; the stored edges keep raw scores.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable
from uuid import UUID

import numpy as np


@dataclass(frozen=True)
class LocalScale:
    """The body component whose scores are scaled, each detection's r, and the property's mean r."""

    component: str
    r: dict[UUID | str, float]
    mean: float

    def __call__(self, raw: float, a, b) -> float:
        """The scaled score of a pair (the raw one where a side has no r: another embedding version)."""
        if a not in self.r or b not in self.r:
            return raw
        return raw - (self.r[a] + self.r[b]) / 2 + self.mean

    def applied(self, components: dict, a, b) -> dict:
        """An edge's component scores with its body score scaled (the others as they are)."""
        if components.get(self.component) is None:
            return components
        return {**components, self.component: self(float(components[self.component]), a, b)}


def neighbours(blocks: Iterable[tuple[int, np.ndarray]], n: int, keep: int, k: int
               ) -> tuple[np.ndarray, dict[tuple[int, int], float]]:
    """(r of each row, {(i, j) i < j: raw similarity}) for rows 0..n-1 from blocks of their similarity rows
    (`(first row, rows x n)`, a row's own column included): r is a row's mean similarity to its k nearest;
    each row keeps the `keep` pairs with the highest locally scaled similarity among its `keep + k` nearest
    by raw similarity (one pass over the similarities: at a season's size, a second would double the
    census's neighbour search)."""
    width = min(keep + k, n - 1)
    if width <= 0 or keep <= 0:
        return np.zeros(n), {}
    r = np.zeros(n)
    cols = np.zeros((n, width), dtype=np.int64)
    sims = np.zeros((n, width))
    for start, block in blocks:
        # a copy (its diagonal is overwritten) in its own precision: float64 would double a season's block
        block = np.array(block)
        rows = np.arange(block.shape[0])
        block[rows, start + rows] = -np.inf
        top = np.argpartition(-block, width - 1, axis=1)[:, :width]
        values = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-values, axis=1, kind="stable")
        cols[start:start + len(rows)] = np.take_along_axis(top, order, axis=1)
        sims[start:start + len(rows)] = np.take_along_axis(values, order, axis=1)
        r[start:start + len(rows)] = sims[start:start + len(rows), :min(k, width)].mean(axis=1) if k > 0 else 0.0
    mean = float(r.mean())
    scaled = sims - (r[:, None] + r[cols]) / 2 + mean
    best = np.argsort(-scaled, axis=1, kind="stable")[:, :min(keep, width)]
    pairs: dict[tuple[int, int], float] = {}
    for i, chosen in enumerate(best):
        for c in chosen:
            j = int(cols[i, c])
            pairs[(min(i, j), max(i, j))] = float(sims[i, c])
    return r, pairs
