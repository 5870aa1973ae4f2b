"""The end-to-end burst and where its time went, read before it and after it: each stage's seconds from the
services' own /metrics (deer_stage_seconds), and the CPU seconds of each process of the stack."""
from __future__ import annotations

import asyncio
from typing import Callable

from deer_reid.bench.end_to_end import BURST_SITE, run_detections
from shared.schemas import PipelineConfig

# the services whose stages the report breaks down
TIMED_SERVICES = ("body", "coat", "antler", "fusion")

StageTotals = dict[str, dict[tuple[str, str], tuple[float, float]]]

WARMUP_DETECTIONS = 32


def measured_burst(stack, crops: list[bytes], config: PipelineConfig, threads: int,
                   progress: Callable[[str], None]) -> tuple[dict, dict]:
    """A warm-up under `config`, then the burst of every crop: the burst's timings (`run_detections`), and
    where its time went: `stages`, `cpu_ms_per_det` and `cpu_ms_per_det_available` (what `threads` cores
    could have given each detection over the burst)."""
    asyncio.run(run_detections(stack, crops[:WARMUP_DETECTIONS], "bench-warmup", None, config))
    # the stages are read outside the CPU window: answering /metrics costs the services CPU too
    stages_before = stage_totals(stack)
    cpu_before = cpu_seconds(stack)
    progress(f"end to end: burst of {len(crops)} detections ...")
    burst = asyncio.run(run_detections(stack, crops, BURST_SITE, None, config))
    cpu_after = cpu_seconds(stack)
    stages_after = stage_totals(stack)
    return burst, {
        "stages": stage_ms_per_detection(stages_before, stages_after, len(crops)),
        # Where the cores went during the burst: CPU milliseconds per detection, by process.
        "cpu_ms_per_det": cpu_ms_per_detection(cpu_before, cpu_after, len(crops)),
        "cpu_ms_per_det_available": round(1000 * threads * burst["seconds"] / len(crops), 2),
    }


def stage_totals(stack) -> StageTotals:
    """service -> (service, stage) -> (sum seconds, count) of deer_stage_seconds on its /metrics."""
    return {name: _stage_totals_of(stack.children[name].port) for name in TIMED_SERVICES}


def _stage_totals_of(port: int) -> dict[tuple[str, str], tuple[float, float]]:
    import urllib.request

    from shared.observability import metric_samples

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[tuple[str, str], list[float]] = {}
    for name, labels, value in metric_samples(text, "deer_stage_seconds"):
        slot = out.setdefault((labels["service"], labels["stage"]), [0.0, 0.0])
        if name.endswith("_sum"):
            slot[0] = value
        elif name.endswith("_count"):
            slot[1] = value
    return {k: (v[0], v[1]) for k, v in out.items()}


def stage_ms_per_detection(before: StageTotals, after: StageTotals, detections: int) -> dict:
    """Each stage that ran in between, as "service/stage": its milliseconds per detection and its calls."""
    stages = {}
    for name in before:
        for key, (total, count) in after[name].items():
            b_total, b_count = before[name].get(key, (0.0, 0.0))
            if count > b_count:
                stages[f"{key[0]}/{key[1]}"] = {"ms_per_det": round(1000 * (total - b_total) / detections, 3),
                                               "calls": int(count - b_count)}
    return stages


def cpu_seconds(stack) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each process of the stack and by the bench itself."""
    import psutil

    def tree(pid: int) -> float:
        try:
            root = psutil.Process(pid)
            total = 0.0
            for proc in [root, *root.children(recursive=True)]:
                try:
                    t = proc.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return 0.0

    out = {name: tree(child.process.pid) for name, child in stack.children.items()}
    if stack.broker is not None:
        out["broker"] = tree(stack.broker.process.pid)
    if stack.postgres is not None:
        out["postgres"] = tree(stack.postgres.pid)
    me = psutil.Process().cpu_times()
    out["bench client"] = me.user + me.system
    return out


def cpu_ms_per_detection(before: dict[str, float], after: dict[str, float], detections: int) -> dict[str, float]:
    """CPU milliseconds per detection spent in between, by process."""
    return {name: round(1000 * (after[name] - before.get(name, 0.0)) / detections, 2) for name in after}
