"""The peer, the denominator of `ratio_to_peer`."""
from __future__ import annotations

import time

import asyncpg
import numpy as np


async def peer_throughput(crops: list[bytes], dsn: str, k: int = 50) -> dict:
    """The way the system we replace worked, on the same crops and database: eager fp32 ResNet50 at batch 1
    (no tracing, no bf16, no micro-batches), then one gallery query per detection, one after the other
    (no pipelining). The weights are left random: they do not change the speed."""
    import timm
    import torch

    from services.fusion import store
    from shared.db import _init_connection
    from shared.images import model_input

    model = timm.create_model("resnet50", pretrained=False, num_classes=0).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    conn = await asyncpg.connect(dsn)
    await _init_connection(conn)
    try:
        # the gallery the pipeline built: the peer's vectors are cut to its size, for the cost of the query
        row = await conn.fetchrow("SELECT version, dim, property FROM embeddings WHERE exemplar LIMIT 1")
        version, dim, prop = (row["version"], row["dim"], row["property"]) if row else ("none", 2048, "default")
        started = time.perf_counter()
        for crop in crops:
            x = torch.from_numpy(model_input(crop, 224)).permute(2, 0, 1).unsqueeze(0).float().div(255)
            with torch.inference_mode():
                vec = model((x - mean) / std)[0].numpy()[:dim].astype(np.float32)
            async with conn.transaction():
                await store.prepare_search(conn, k)
                await store.nearest_exemplars(conn, vec / (np.linalg.norm(vec) or 1.0), version, prop, "unknown", k)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
    return {"det_per_s": round(len(crops) / elapsed, 2), "ms_per_det": round(1000 * elapsed / len(crops), 1),
            "gallery_version": version}
