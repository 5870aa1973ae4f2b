"""bench: body throughput (bare models against the whole pipeline; with --all-features, fast mode against
every enhancement with the ensemble off and on), or instead a precision check, the gallery search, or one
re-clustering. The one place the command line imports `deer_reid.bench`."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from deer_reid.cli.context import settings_for
from deer_reid.cli.output import keep_json, print_json
from deer_reid.cli.parsing import add_command


def register(commands) -> None:
    be = add_command(commands, "bench", cmd_bench,
                     help="body throughput: bare models vs the whole pipeline, in one run")
    be.add_argument("--mode", choices=("fast", "enhanced"), default="fast")
    be.add_argument("--all-features", action="store_true",
                    help="with --mode enhanced: every enhancement on (coat, pose, antler, temporal), measured as fast "
                         "mode, enhanced with the ensemble off and with it on, in one run, with a table per stage")
    be.add_argument("--detections", type=int, default=512)
    be.add_argument("--body-model", help="override the mode's models (comma-separated)")
    be.add_argument("--photos", type=Path, metavar="DIR",
                    help="crops from the photos under DIR (seeded order) instead of synthetic ones: the coat's "
                         "keypoint matchers find and match as many keypoints as on real animals")
    be.add_argument("--precision", choices=("auto", "fp32", "bf16"))
    be.add_argument("--json", help="write the result here")
    be.add_argument("--precision-check", metavar="DATA_DIR",
                    help="instead: cosine of bf16 against fp32 embeddings of the labelled images in DATA_DIR")
    be.add_argument("--gallery", type=int, metavar="N",
                    help="instead: fusion's gallery search (p50/p99, recall against exact search) over N synthetic "
                         "exemplars in a fresh embedded PostgreSQL")
    be.add_argument("--gallery-queries", type=int, default=500)
    be.add_argument("--census", type=int, metavar="N",
                    help="instead: one re-clustering of an N-detection property (synthetic embeddings, one individual "
                    "per photo to start from) in a fresh embedded PostgreSQL")


def cmd_bench(args) -> int:
    from deer_reid.stack import with_jemalloc

    if args.all_features and args.mode != "enhanced":
        print("deer-reid bench: --all-features goes with --mode enhanced (it measures fast mode as well)",
              file=sys.stderr)
        return 2
    env = with_jemalloc(dict(os.environ))
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        # The bare measurement runs under the same allocator as the services it is compared with.
        # its own arguments, not sys.argv: called as main([...]) from a script or a test, those differ
        os.execve(sys.executable, [sys.executable, "-m", "deer_reid.cli", *args.argv], env)

    result = _measure(args)
    keep_json(result, args.json)
    print_json(result)
    return 0


def _measure(args) -> dict:
    from deer_reid.bench import precision_check, run_bench

    settings = settings_for(args)
    if args.census:
        from deer_reid.census_bench import census_bench

        return census_bench(args.census, progress=_progress)
    if args.gallery:
        from deer_reid.gallery_bench import gallery_bench

        return gallery_bench(args.gallery, k=settings.candidates_k, queries=args.gallery_queries,
                             per_individual=settings.exemplars_per_individual, progress=_progress)
    if args.precision_check:
        names = [n.strip() for n in (args.body_model or "efficientnet_lite0").split(",")]
        return precision_check(Path(args.precision_check), names, settings)
    if args.all_features:
        from deer_reid.bench.all_features import all_features_table, run_all_features_bench

        result = run_all_features_bench(args.detections, settings, body_model=args.body_model, progress=_progress,
                                        photos=args.photos)
        # the table on stderr beside the progress: stdout stays the JSON scripts read
        _progress(all_features_table(result))
        return result
    return run_bench(args.mode, args.detections, settings, body_model=args.body_model, progress=_progress,
                     photos=args.photos)


def _progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
