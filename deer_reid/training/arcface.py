"""Sub-center ArcFace (Deng et al., 2020): an additive angular margin over class centres, with K
centres per class so that a class with two looks (a deer by day and by night) need not be pulled to
one point, and a mislabelled photo can sit on a sub-centre of its own instead of dragging the class.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class SubCenterArcFace(torch.nn.Module):
    def __init__(self, dim: int, classes: int, subcenters: int = 3, scale: float = 30.0, margin: float = 0.3):
        super().__init__()
        self.classes, self.k, self.scale, self.margin = classes, subcenters, scale, margin
        self.weight = torch.nn.Parameter(torch.empty(classes * subcenters, dim))
        torch.nn.init.xavier_uniform_(self.weight)

    def cosines(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, classes): each class's best sub-centre cosine."""
        cos = F.linear(F.normalize(embeddings.float()), F.normalize(self.weight.float()))
        return cos.view(-1, self.classes, self.k).max(dim=2).values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cos = self.cosines(embeddings).clamp(-1 + 1e-7, 1 - 1e-7)
        target = cos.gather(1, labels[:, None])
        # cos(theta + m), falling back to a linear penalty where theta + m would pass pi (keeps it monotone)
        with_margin = torch.where(target > math.cos(math.pi - self.margin),
                                  torch.cos(torch.acos(target) + self.margin),
                                  target - math.sin(math.pi - self.margin) * self.margin)
        logits = cos.scatter(1, labels[:, None], with_margin) * self.scale
        return F.cross_entropy(logits, labels)
