"""`deer-reid bench`: body throughput, bare models against the whole pipeline, in one run.

1. matmul peak of this machine (fp32 and bf16), the yardstick for achieved GFLOP/s (bare.py);
2. bare: the body extractor alone on the crops (JPEG decode, resize, models), batch 16 (bare.py); in the
   enhanced mode, the coat, antler and pose services' own work per crop as well (components.py);
3. end to end: a fresh embedded stack (broker, database, services); detection rows are
   written as the API writes them, the events are produced to the detections topic
   and the bench waits for every result on the results topic. A burst measures
   throughput; a paced run at half that rate measures latency (p50/p99) (end_to_end.py);
   where the burst's time went, per stage and per process (stages.py);
4. the peer: the way the system we replace worked, on the same crops and the same database (eager fp32
   ResNet50 at batch 1, one gallery query per detection, nothing pipelined), and our end-to-end
   throughput over it (`ratio_to_peer`) (peer.py).
report.py runs them in this order and assembles the JSON report. `bench --mode enhanced --all-features`
(all_features.py) runs 1-3 and the peer for three configurations in one run instead (fast mode, every
enhancement with the ensemble off, and with it on) and prints their per-stage table. `bench --precision-check` compares bf16
with fp32 embeddings instead (precision.py).
Speed does not depend on weights, so models without weights run on random ones
(and the report says so).

The modules import torch, timm and the services inside their functions: `deer-reid bench` imports this
package before it re-executes itself under jemalloc, and what the first process imports is loaded for
nothing.
"""
from deer_reid.bench.peer import peer_throughput
from deer_reid.bench.precision import precision_check
from deer_reid.bench.report import run_bench

__all__ = ["peer_throughput", "precision_check", "run_bench"]
