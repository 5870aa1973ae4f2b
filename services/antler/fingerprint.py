"""The 64-dimensional antler fingerprint: a network embedding of the antler region, projected.

The network is a registered body model (EfficientNet-Lite0, ImageNet weights, by default) run on the
region alone. Its embedding goes through a fixed random orthonormal projection to 64 dimensions,
seeded and therefore the same in every process. It depends on no labelled data, so nothing trained on
evaluation photos ships with the code. `deer-reid eval --antler` measures it against the full embedding
of the region (the projection keeps cosine similarities to within a few hundredths). The version names
the network's weights, the projection's seed and the region rule: fingerprints of different versions
are never compared.
"""
from __future__ import annotations

import cv2
import numpy as np

from services.antler.geometry import VERSION as GEOMETRY_VERSION
from shared.models import LoadedModel

DIM = 64
SEED = 20241


def projection(source_dim: int, dim: int = DIM, seed: int = SEED) -> np.ndarray:
    """(source_dim, dim) with orthonormal columns (QR of a seeded Gaussian matrix)."""
    gauss = np.random.default_rng(seed).standard_normal((source_dim, dim))
    q, r = np.linalg.qr(gauss)
    return (q * np.sign(np.diag(r))).astype(np.float32)  # sign-fixed: the same matrix everywhere


class Fingerprinter:
    def __init__(self, model: LoadedModel):
        self.model = model
        self.matrix = projection(model.spec.dim)

    @property
    def version(self) -> str:
        return f"antler-fp{DIM}:{self.model.version}:rp-s{SEED}:{GEOMETRY_VERSION}"

    def region_input(self, region_rgb: np.ndarray) -> np.ndarray:
        size = self.model.spec.input_size
        return cv2.resize(region_rgb, (size, size), interpolation=cv2.INTER_AREA).astype(np.uint8)

    def full(self, regions: list[np.ndarray]) -> np.ndarray:
        """(N, network dim) L2-normalised embeddings of antler regions (RGB uint8, any size)."""
        return self.model.embed(np.stack([self.region_input(r) for r in regions]))

    def __call__(self, regions: list[np.ndarray]) -> np.ndarray:
        """(N, 64) L2-normalised fingerprints."""
        return project(self.full(regions), self.matrix)


def project(full: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    out = full @ matrix
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
