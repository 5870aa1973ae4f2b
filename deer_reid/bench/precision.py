"""`deer-reid bench --precision-check DATA_DIR`: how far bf16 moves the body models' embeddings from fp32."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.config import Settings


def precision_check(data_dir: Path, names: list[str], settings: Settings, limit: int | None = None,
                    progress: bool = True) -> dict:
    """Cosine between fp32 and bf16 embeddings of the same real images, per model."""
    from deer_reid.evaluation.dataset import load_dataset
    from deer_reid.evaluation.features import embed_samples

    samples = load_dataset(data_dir)[:limit] if limit else load_dataset(data_dir)
    out = {}
    embedded = {}
    for precision in ("fp32", "bf16"):
        s = settings.model_copy(update={"precision": precision})
        embedded[precision], _ = embed_samples(samples, names, s, progress=progress)
    for name in names:
        cos = np.sum(embedded["fp32"][name] * embedded["bf16"][name], axis=1)
        out[name] = {"images": len(samples), "cosine_min": round(float(cos.min()), 5),
                     "cosine_p1": round(float(np.percentile(cos, 1)), 5), "cosine_mean": round(float(cos.mean()), 5),
                     "passes_0.99": bool(cos.min() >= 0.99)}
    return out
