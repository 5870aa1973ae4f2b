"""Body appearance: cosine similarity of two embeddings of the same version (L2-normalised vectors).

In the service, pgvector computes the same cosine over the gallery's halfvec exemplars; exemplars
found after the search (individuals founded meanwhile) are scored here.
"""
from __future__ import annotations

import numpy as np


def body_component(model: str) -> str:
    return f"body:{model}"


def body_similarity(query: np.ndarray, exemplar: np.ndarray) -> float | None:
    if query.shape != exemplar.shape:
        return None  # different versions never meet; a shape mismatch is no evidence, not a score
    denom = float(np.linalg.norm(query) * np.linalg.norm(exemplar))
    return float(query @ exemplar) / denom if denom > 0 else None


def body_similarity_matrix(embeddings: np.ndarray) -> np.ndarray:
    """All pairwise cosines of L2-normalised embeddings (N, dim) -> (N, N)."""
    return embeddings @ embeddings.T
