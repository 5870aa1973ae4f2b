"""Re-ranking a shortlist: pure functions that eval measures and fusion may adopt where they help.

αQE (Radenović et al., 2018): the query embedding is replaced by the similarity-weighted mean of
itself and its k nearest gallery neighbours (weights sim^alpha), then compared again. It pulls a
query toward the cluster its best matches form, which helps when one good photo of an individual
sits among several weaker ones.
"""
from __future__ import annotations

import numpy as np


def expanded_query(query: np.ndarray, gallery: np.ndarray, k: int = 2, alpha: float = 3.0) -> np.ndarray:
    """The αQE query: `query` (d,) with its `k` nearest rows of `gallery` (n, d), all L2-normalised."""
    if k <= 0 or gallery.shape[0] == 0:
        return query
    sims = gallery @ query
    top = np.argsort(-sims, kind="stable")[:k]
    weights = np.clip(sims[top], 0, None) ** alpha
    q = query + (weights[:, None] * gallery[top]).sum(axis=0)
    return q / np.linalg.norm(q)
