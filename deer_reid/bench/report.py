"""`run_bench`: the parts of the bench in order, on the same crops (synthetic, or `--photos`), and the JSON report they make
(people and scripts read its keys: keep them)."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

from deer_reid.bench.bare import bench_crops, matmul_peak, measure_bare
from deer_reid.bench.components import component_costs
from deer_reid.bench.end_to_end import (PACED_SITE, coat_stored_bytes, fresh_stack, one_mode_config,
                                        pose_requested_share, run_detections, run_pose_requests)
from deer_reid.bench.peer import peer_throughput
from deer_reid.bench.stages import measured_burst
from shared.config import Settings

MODES = {"fast": "resnet50", "enhanced": "resnet50,efficientnet_b3,vit_base_patch16_224"}


def run_bench(mode: str, detections: int, settings: Settings, body_model: str | None = None,
              progress=print, photos: Path | None = None) -> dict:
    import torch

    from shared.models import weights_available

    names = [n.strip() for n in (body_model or MODES[mode]).split(",") if n.strip()]
    allow_random = not all(weights_available(n, settings.model_cache) for n in names)
    threads = settings.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    result: dict = {"mode": mode, "detections": detections, "body_models": names, "threads": threads}
    progress("measuring matmul peak ...")
    result["matmul_peak_gflops"] = {p: round(matmul_peak(p), 1) for p in ("fp32", "bf16")}

    crops, result["crops"] = bench_crops(detections, photos)
    bare, gflop = measure_bare(names, crops, settings, allow_random, progress)
    result.update(bare)
    if mode == "enhanced":
        result.update(component_costs(crops[:32], settings, progress))

    config = one_mode_config(mode)
    stack = fresh_stack(settings, names, mode, allow_random)
    progress("starting the stack ...")
    stack.start()
    try:
        burst, where_time_went = measured_burst(stack, crops, config, threads, progress)
        paced_crops = crops[: max(64, detections // 2)]
        rate = burst["det_per_s"] / 2
        progress(f"end to end: {len(paced_crops)} detections paced at {rate:.1f}/s for latency ...")
        paced = asyncio.run(run_detections(stack, paced_crops, PACED_SITE, rate, config))
        progress(f"the system we replace on the same {detections} crops: eager fp32 ResNet50 at batch 1, "
                 "a query per detection ...")
        result["peer"] = asyncio.run(peer_throughput(crops, stack.dsn))
        if mode == "enhanced":
            result["coat_stored_bytes_per_detection"] = asyncio.run(coat_stored_bytes(stack.dsn))
            result["pose_requested"] = asyncio.run(pose_requested_share(stack.dsn))
            progress("pose requests straight to the pose service ...")
            result["pose_service"] = asyncio.run(run_pose_requests(stack, crops[:64], "bench-pose"))
    finally:
        stack.stop()
    result.update({
        "e2e_det_per_s": round(burst["det_per_s"], 2),
        "ratio": round(burst["det_per_s"] / result["bare_det_per_s"], 3),
        "p50_ms": round(paced["p50_ms"], 1), "p99_ms": round(paced["p99_ms"], 1),
        "latency_rate_det_per_s": round(rate, 1),
        # our end-to-end throughput over the peer's, measured in this run on the same crops
        "ratio_to_peer": round(burst["det_per_s"] / result["peer"]["det_per_s"], 2),
        "burst_p50_ms": round(burst["p50_ms"], 1), "burst_p99_ms": round(burst["p99_ms"], 1),
        **where_time_went,
    })
    peak = result["matmul_peak_gflops"]["bf16" if "bf16" in result["precision"].values() else "fp32"]
    result["achieved_gflops_bare"] = round(gflop * result["bare_det_per_s"], 1)
    result["achieved_gflops_e2e"] = round(gflop * result["e2e_det_per_s"], 1)
    result["achieved_share_of_matmul_peak"] = round(result["achieved_gflops_e2e"] / peak, 3)
    return result
