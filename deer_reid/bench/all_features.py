"""`bench --mode enhanced --all-features`: where the time goes with every enhancement on, against fast mode,
in one run on the same crops. Three configurations, each on a fresh stack of its own:

- `fast`: fast mode, the fast body model;
- `enhanced`: enhanced mode with coat, pose (selective), antler and temporal on and the ensemble off, so its
  body runs the same single model as `fast` and the difference between the two is the enhancements' cost;
- `ensemble`: the same with the body ensemble on.

A stack per configuration rather than one stack switched between them: every burst enrols its detections in
the gallery, and `enhanced` searches the same model's gallery as `fast` (and matches coat patterns against
the photos it shortlists), so on a shared stack each configuration's cost would depend on what ran before
it. Fresh, each starts from the same empty database and the same warm-up, as a one-mode run does.
"""
from __future__ import annotations

import asyncio
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from deer_reid.bench.bare import bench_crops, cpu_model, measure_bare
from deer_reid.bench.end_to_end import coat_photos_matched, fresh_stack, pose_requested_share
from deer_reid.bench.peer import peer_throughput
from deer_reid.bench.report import MODES
from deer_reid.bench.stages import measured_burst
from shared.config import Settings
from shared.pipeline import body_models_for
from shared.schemas import PipelineConfig

EVERY_ENHANCEMENT = {"coat": True, "pose": True, "antler": True, "temporal": True}
CONFIGURATIONS = {
    "fast": PipelineConfig(mode="fast", temporal=True),
    "enhanced": PipelineConfig(mode="enhanced", ensemble=False, **EVERY_ENHANCEMENT),
    "ensemble": PipelineConfig(mode="enhanced", ensemble=True, **EVERY_ENHANCEMENT),
}


def run_all_features_bench(detections: int, settings: Settings, body_model: str | None = None,
                           progress=print, photos: Path | None = None) -> dict:
    """The report: the machine, then per configuration its throughput end to end and bare, and where its
    burst's time went; then the ratios between them and to the peer (measured on the `fast` stack)."""
    import torch

    from shared.models import weights_available

    ensemble = [n.strip() for n in (body_model or MODES["enhanced"]).split(",") if n.strip()]
    single = ensemble[:1]  # the fast model, which `enhanced` runs too
    allow_random = not all(weights_available(n, settings.model_cache) for n in ensemble)
    threads = settings.torch_threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    result: dict = {"mode": "enhanced", "all_features": True, "detections": detections, "cpu_model": cpu_model(),
                    "threads": threads, "load_average": [round(x, 2) for x in os.getloadavg()],
                    "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}

    crops, result["crops"] = bench_crops(detections, photos)
    bare_single, _ = measure_bare(single, crops, settings, allow_random, progress)
    bare_ensemble, _ = measure_bare(ensemble, crops, settings, allow_random, progress)
    result["weights_real"] = bare_single["weights_real"] and bare_ensemble["weights_real"]
    result["precision"] = bare_ensemble["precision"]
    result["engine"] = bare_ensemble["engine"]

    for name, config in CONFIGURATIONS.items():
        models = body_models_for(config, single, ensemble)
        bare = bare_ensemble if models == ensemble else bare_single
        progress(f"{name}: starting a fresh stack ({'+'.join(models)}) ...")
        stack = fresh_stack(settings, models, config.mode, allow_random)
        stack.start()
        try:
            burst, where_time_went = measured_burst(stack, crops, config, threads, progress)
            if name == "fast":
                progress(f"the system we replace on the same {detections} crops ...")
                result["peer"] = asyncio.run(peer_throughput(crops, stack.dsn))
            pose_requested = asyncio.run(pose_requested_share(stack.dsn)) if config.mode == "enhanced" else None
            photos_matched = asyncio.run(coat_photos_matched(stack.dsn)) if config.coat else None
        finally:
            stack.stop()
        # a run makes three stacks: each one's home goes once it is measured (a failed one keeps its logs)
        shutil.rmtree(stack.home, ignore_errors=True)
        result[name] = {
            "switches": {"mode": config.mode, **config.switches()}, "body_models": models,
            "e2e_det_per_s": round(burst["det_per_s"], 2), "bare_det_per_s": bare["bare_det_per_s"],
            "ratio": round(burst["det_per_s"] / bare["bare_det_per_s"], 3),
            "burst_p50_ms": round(burst["p50_ms"], 1), "burst_p99_ms": round(burst["p99_ms"], 1),
            "decided": burst["decided"], "degraded": burst["degraded"],
            **where_time_went,
        }
        if pose_requested is not None:
            result[name]["pose_requested"] = pose_requested
        if photos_matched is not None:
            fusion_ms = result[name]["cpu_ms_per_det"].get("fusion")
            result[name]["coat_photos_matched_per_det"] = photos_matched
            result[name]["fusion_cpu_ms_per_photo_matched"] = \
                round(fusion_ms / photos_matched, 3) if fusion_ms and photos_matched else None
    result["enhanced_over_fast"] = round(result["enhanced"]["e2e_det_per_s"] / result["fast"]["e2e_det_per_s"], 3)
    result["ensemble_over_bare"] = result["ensemble"]["ratio"]
    result["ratio_to_peer"] = round(result["fast"]["e2e_det_per_s"] / result["peer"]["det_per_s"], 2)
    return result


def all_features_table(result: dict) -> str:
    """The report as a Markdown table, one column per configuration: each stage's milliseconds per detection
    (time inside the stage, from the services' /metrics), each process's CPU milliseconds per detection, and
    the throughputs."""
    names = list(CONFIGURATIONS)
    columns = [result[n] for n in names]

    def row(label: str, values, decimals: int = 1) -> str:
        return f"| {label} | " + " | ".join("" if v is None else f"{v:.{decimals}f}" for v in values) + " |"

    stages = sorted({s for c in columns for s in c["stages"]})
    processes = list(dict.fromkeys(p for c in columns for p in c["cpu_ms_per_det"]))
    lines = [f"{result['cpu_model']}, {result['threads']} threads, {result['detections']} detections, "
             f"{'real' if result['weights_real'] else 'random'} weights, load average "
             f"{result['load_average'][0]:g} at the start, {result['measured_at']}",
             "stage: milliseconds spent inside the service's stage (its /metrics; `handle` is the whole handler, "
             "the stages it runs included); CPU: the process's CPU milliseconds; both per detection of the burst",
             "",
             "| per detection | " + " | ".join(names) + " |",
             "|---|" + "---:|" * len(names)]
    lines += [row(f"stage {s} (ms)", [c["stages"].get(s, {}).get("ms_per_det") for c in columns]) for s in stages]
    lines += [row(f"CPU {p} (ms)", [c["cpu_ms_per_det"].get(p) for c in columns]) for p in processes]
    lines += [row("CPU available (ms)", [c["cpu_ms_per_det_available"] for c in columns]),
              row("end to end (det/s)", [c["e2e_det_per_s"] for c in columns]),
              row("bare body (det/s)", [c["bare_det_per_s"] for c in columns]),
              row("end to end / bare", [c["ratio"] for c in columns], decimals=3),
              row("degraded (detections)", [c["degraded"] for c in columns], decimals=0),
              row("coat: gallery photos matched a detection", [c.get("coat_photos_matched_per_det") for c in columns]),
              row("CPU fusion per photo matched (ms)", [c.get("fusion_cpu_ms_per_photo_matched") for c in columns],
                  decimals=2),
              "",
              f"enhanced / fast {result['enhanced_over_fast']:g}, ensemble / bare ensemble "
              f"{result['ensemble_over_bare']:g}, fast / peer {result['ratio_to_peer']:g} "
              f"(peer {result['peer']['det_per_s']:g} det/s)"]
    return "\n".join(lines)
