"""Body appearance (`body:<model>`, one component per body network): the cosine of two embeddings.

An item is an embedding vector. Vectors of different lengths (different versions) never meet: no evidence,
not a score. In the service the gallery search itself runs in PostgreSQL, where pgvector ranks the
property's halfvec exemplars by this same cosine (`store.nearest_exemplars`, an index over every photo);
the photos found after that search (individuals founded meanwhile) are scored here.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from shared.components.base import Component, cosine, grouped, register_family

BODY = "body"


def body_component(model: str) -> str:
    return f"{BODY}:{model}"


class BodySimilarity(Component):
    reads = BODY

    def __init__(self, model: str):
        self.model = model
        self.name = body_component(model)

    def similarity(self, queries: Sequence[np.ndarray], gallery: Sequence[np.ndarray]) -> np.ndarray:
        return grouped(queries, gallery, lambda v: None if v is None else np.shape(v),
                       lambda q, g: cosine(np.stack(q), np.stack(g)))


register_family(BODY, BodySimilarity)
