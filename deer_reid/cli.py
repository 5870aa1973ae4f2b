"""The `deer-reid` command line."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from deer_reid.client import api_key, api_url, auth_headers, call_api
from shared.config import Settings
from shared.schemas import DetectionClass


def _settings(args) -> Settings:
    overrides = {}
    if getattr(args, "home", None):
        overrides["home"] = args.home
    if getattr(args, "body_model", None) and args.command == "up":
        overrides["body_model"] = args.body_model
    if getattr(args, "body_ensemble", None):
        overrides["body_ensemble"] = args.body_ensemble
    if getattr(args, "allow_random_weights", False):
        overrides["allow_random_weights"] = True
    if getattr(args, "api_port", None):
        overrides["api_port"] = args.api_port
    if getattr(args, "precision", None):
        overrides["precision"] = args.precision
    return Settings(**overrides)


def cmd_up(args) -> int:
    from deer_reid.stack import Stack, StackError, pid_alive, read_state

    settings = _settings(args)
    existing = read_state(settings.home)
    if existing and pid_alive(existing["supervisor_pid"]):
        print(f"already running (supervisor pid {existing['supervisor_pid']}, API {existing['api_url']})")
        return 0
    if args.detach:
        return _detach(args, settings)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s up %(levelname)s %(message)s")
    stack = Stack(settings)
    try:
        stack.start()
    except StackError as exc:
        stack.stop()
        print(f"deer-reid up: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        stack.stop()
        raise
    print(f"deer-reid is up: API {stack.api_url}  (logs in {settings.home / 'logs'}; Ctrl-C stops everything)\n"
          f"the page: {stack.api_url}/ui (`deer-reid page` prints a link that signs you in)", flush=True)
    stack.run_forever()
    return 0


def _detach(args, settings: Settings) -> int:
    from deer_reid.stack import Stack, StackError, pid_alive, read_state

    try:
        Stack(settings).check_models()  # refuse before forking: the message must reach this terminal
    except StackError as exc:
        print(f"deer-reid up: {exc}", file=sys.stderr)
        return 2
    (settings.home / "logs").mkdir(parents=True, exist_ok=True)
    log_path = settings.home / "logs" / "supervisor.log"
    argv = [sys.executable, "-m", "deer_reid.cli", "up", "--home", str(settings.home),
            "--body-model", settings.body_model, "--api-port", str(settings.api_port)]
    if settings.body_ensemble:
        argv += ["--body-ensemble", settings.body_ensemble]
    if settings.allow_random_weights:
        argv.append("--allow-random-weights")
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        state = read_state(settings.home)
        if state and state.get("supervisor_pid") == proc.pid and state.get("status") == "healthy":
            print(f"deer-reid is up: API {state['api_url']} (supervisor pid {proc.pid}; `deer-reid down` stops it)\n"
                  f"the page: {state['api_url']}/ui (`deer-reid page` prints a link that signs you in)")
            return 0
        if proc.poll() is not None:
            print(f"deer-reid up failed (exit {proc.returncode}); last lines of {log_path}:", file=sys.stderr)
            print("\n".join(log_path.read_text(errors="replace").splitlines()[-20:]), file=sys.stderr)
            return 2
        time.sleep(0.3)
    print(f"deer-reid up: not healthy after {args.timeout}s; see {log_path}", file=sys.stderr)
    if pid_alive(proc.pid):
        os.kill(proc.pid, signal.SIGTERM)
    return 2


def cmd_down(args) -> int:
    from deer_reid.stack import pid_alive, read_state

    settings = _settings(args)
    state = read_state(settings.home)
    if not state or not pid_alive(state["supervisor_pid"]):
        print("deer-reid is not running")
        return 0
    pid = state["supervisor_pid"]
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(pid):
        print(f"supervisor {pid} did not stop in 60s", file=sys.stderr)
        return 1
    print("deer-reid stopped")
    return 0


def _reported(command: str, run, refusals: tuple[type[Exception], ...], refused_exit: int = 2) -> int:
    """Run a command's body: its report printed as JSON (exit 0), or its refusal on stderr (exit 2, or
    `refused_exit` where the refusal is a failure along the way rather than a refused input)."""
    try:
        report = run()
    except refusals as exc:
        print(f"deer-reid {command}: {exc}", file=sys.stderr)
        return refused_exit
    print(json.dumps(report, indent=2, default=str))
    return 0


def cmd_backup(args) -> int:
    from deer_reid.backup import BackupError, backup

    settings = _settings(args)
    return _reported("backup", lambda: backup(database_url_for(settings), Path(args.out), blobs=settings.blobs,
                                              model_cache=settings.model_cache, prop=args.property),
                     (BackupError,))


def cmd_restore(args) -> int:
    from deer_reid.backup import BackupError, restore

    settings = _settings(args)
    if settings.database_url:
        print("deer-reid restore: DEER_DATABASE_URL is set: restore brings a backup into the embedded default's "
              "home; for a managed PostgreSQL use pg_restore (see the README)", file=sys.stderr)
        return 2
    return _reported("restore", lambda: restore(Path(args.backup), settings.home, blobs=settings.blobs,
                                                model_cache=settings.model_cache, force=args.force), (BackupError,))


def cmd_doctor(args) -> int:
    from deer_reid.doctor import checks, report

    text, status = report(checks(_settings(args)))
    print(text)
    return status


def cmd_status(args) -> int:
    from deer_reid.stack import pid_alive, read_state, service_health

    settings = _settings(args)
    state = read_state(settings.home)
    running = bool(state and pid_alive(state["supervisor_pid"]))
    if running:  # each service's own word on what it runs (the pose service: which viewpoint path, and why)
        for name, service in state.get("services", {}).items():
            service["health"] = service_health(state, name, settings.metrics_host)
    print(json.dumps({"running": running, **(state or {})}, indent=2))
    return 0 if running else 1


def cmd_soak(args) -> int:
    from deer_reid.soak import exit_status, soak

    settings = _settings(args)
    try:
        report = asyncio.run(soak(settings.home, Path(args.photos), args.detections, dsn=settings.database_url or None,
                                  rate=args.rate, faults=args.faults, concurrency=args.concurrency,
                                  timeout=args.timeout, seed=args.seed, headers=auth_headers(settings),
                                  progress=not args.quiet))
    except RuntimeError as exc:
        print(f"deer-reid soak: {exc}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return exit_status(report)


def cmd_k8s(args) -> int:
    from deer_reid.k8s import write

    for path in write(Path(args.out)):
        print(path)
    return 0


def cmd_dashboard(args) -> int:
    from deer_reid.dashboard import write

    print(write(Path(args.out)))
    return 0


def cmd_migrate(args) -> int:
    """Apply the database migrations and create the topics (an external Kafka and PostgreSQL)."""
    from shared.db import migrate
    from shared.topics import ensure_topics

    settings = _settings(args)
    if not settings.database_url:
        print("deer-reid migrate: DEER_DATABASE_URL is not set (`up` migrates the embedded database itself)",
              file=sys.stderr)
        return 2

    async def run():
        created = await ensure_topics(settings.kafka_bootstrap)
        applied = await migrate(settings.database_url)
        return created, applied

    created, applied = asyncio.run(run())
    print(json.dumps({"topics_created": created, "migrations_applied": applied}))
    return 0


def database_url_for(settings: Settings) -> str:
    from deer_reid.stack import read_state

    if settings.database_url:
        return settings.database_url
    state = read_state(settings.home)
    if not state:
        raise SystemExit("deer-reid: no running stack found (deer-reid up) and DEER_DATABASE_URL is not set")
    return state["database_url"]


def _api(args, method: str, path: str, **kw):
    """A call to the API the arguments point at."""
    settings = _settings(args)
    return call_api(settings, api_url(settings, args.api_url), method, path, **kw)


def cmd_sites(args) -> int:
    if args.action == "add":
        body = {"property": args.property, "lat": args.lat, "lon": args.lon}
        print(json.dumps(_api(args, "PUT", f"/v1/sites/{args.name}", json=body), indent=2))
        return 0
    sites = _api(args, "GET", "/v1/sites")["sites"]
    print(f"{'site':24s} {'property':16s} {'lat':>10s} {'lon':>11s} {'detections':>10s}")
    for s in sites:
        lat = f"{s['lat']:.5f}" if s["lat"] is not None else "-"
        lon = f"{s['lon']:.5f}" if s["lon"] is not None else "-"
        print(f"{s['name']:24s} {s['property']:16s} {lat:>10s} {lon:>11s} {s['detections']:>10d}")
    return 0


def cmd_census(args) -> int:
    import httpx

    from deer_reid.census import recluster

    if args.action == "status":
        print(json.dumps(_api(args, "GET", f"/v1/census/{args.property}"), indent=2, default=str))
        return 0
    settings = _settings(args)
    with httpx.Client(base_url=api_url(settings, args.api_url), headers=auth_headers(settings), timeout=60) as client:
        return _reported("census recluster", lambda: recluster(client, args.property, timeout=args.timeout),
                         (RuntimeError, httpx.HTTPError), refused_exit=1)


def cmd_gallery(args) -> int:
    from deer_reid.gallery import rebuild

    settings = _settings(args)
    report = asyncio.run(rebuild(database_url_for(settings), settings.exemplars_per_individual,
                                 prop=args.property, progress=not args.quiet))
    print(json.dumps(report, indent=2))
    return 0


def cmd_calibration(args) -> int:
    from shared.calibration_artifact import ArtifactError, load_file

    if args.action == "show":
        print(json.dumps(_api(args, "GET", "/v1/calibration"), indent=2, default=str))
        return 0
    try:
        artifact = load_file(Path(args.file))
    except ArtifactError as exc:
        print(f"deer-reid calibration: {exc}", file=sys.stderr)
        return 2
    installed = _api(args, "POST", "/v1/calibration", json=artifact)
    print(f"installed calibration {installed['id']} (thresholds {artifact['thresholds']}); fusion uses it from its "
          "next batch")
    return 0


def cmd_train(args) -> int:
    from deer_reid.evaluation.dataset import DatasetError
    from deer_reid.training.train import TrainConfig, TrainError, train

    settings = _settings(args)
    in_use = _models_in_use(settings)
    validation = args.validation_identities if args.validation_identities is not None else 0 if args.folds else 15
    cfg = TrainConfig(name=args.name, base=args.base, epochs=args.epochs, input_size=args.input_size, seed=args.seed,
                      holdout_identities=args.holdout_identities, validation_identities=validation, folds=args.folds,
                      batch=args.batch, lr=args.lr, precision=args.precision or "fp32", overwrite=args.overwrite,
                      resume=args.resume, average_from=args.average_from, erase=args.erase,
                      refit=args.refit, distill=args.distill, subcenters=args.subcenters)
    try:
        card = train(Path(args.data_dir), cfg, settings, in_use=in_use, progress=not args.quiet)
    except (TrainError, DatasetError) as exc:
        print(f"deer-reid train: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(card, indent=2))
    print(json.dumps({k: card[k] for k in ("name", "embedding_version", "selected_epoch", "validation", "seconds",
                                           "classes", "classes_by", "precision")}, indent=2))
    print(f"\nmodel {card['name']} is in {settings.model_cache / card['name']}; measure it on identities it never "
          f"learned: deer-reid eval {args.data_dir} --protocol loo --body-model {card['name']}")
    return 0


def cmd_train_soup(args) -> int:
    from deer_reid.evaluation.dataset import DatasetError
    from deer_reid.training.soup import soup
    from deer_reid.training.train import TrainError
    from shared.models import MissingWeights

    settings = _settings(args)
    try:
        card = soup(args.name, args.ingredients, settings, overwrite=args.overwrite, in_use=_models_in_use(settings),
                    progress=not args.quiet)
    except (TrainError, DatasetError, MissingWeights) as exc:
        print(f"deer-reid train soup: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(card, indent=2))
    print(json.dumps({k: card[k] for k in ("name", "embedding_version", "validation", "seconds")}
                     | {"kept": card["soup"]["kept"]}, indent=2))
    print(f"\nmodel {card['name']} is in {settings.model_cache / card['name']}; measure it on identities none of "
          f"its ingredients learned: deer-reid eval {card['data']['folder']} --protocol loo --body-model {card['name']}")
    return 0


def _models_in_use(settings) -> set[str]:
    """The body models the running stack (if any) serves: never replaced under it."""
    from deer_reid.stack import pid_alive, read_state

    state = read_state(settings.home)
    if state and pid_alive(state["supervisor_pid"]):
        return {state.get("body_model"), *(state.get("body_ensemble") or [])}
    return set()


def cmd_train_viewpoint(args) -> int:
    from deer_reid.evaluation.dataset import DatasetError
    from deer_reid.training.viewpoint import ViewpointConfig, summary, train_viewpoint
    from shared.models import MissingWeights

    cfg = ViewpointConfig(name=args.name, backbone=args.backbone, seed=args.seed,
                          holdout_identities=args.holdout_identities, validation_identities=args.validation_identities,
                          target_accuracy=args.target_accuracy, overwrite=args.overwrite)
    settings = _settings(args)
    try:
        card = train_viewpoint(Path(args.data_dir), cfg, settings, progress=not args.quiet)
    except (DatasetError, MissingWeights) as exc:
        print(f"deer-reid train viewpoint: {exc}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(card, indent=2))
    print(summary(card))
    print(f"\nviewpoint classifier {card['name']} is in {settings.model_cache / card['name']}; the pose service "
          f"uses it with DEER_POSE_VIEWPOINT_MODEL={card['name']}")
    return 0


def cmd_export_labels(args) -> int:
    from deer_reid.training.labels import ExportError, export_labels

    settings = _settings(args)
    return _reported("export-labels", lambda: asyncio.run(export_labels(
        database_url_for(settings), Path(args.out), prop=args.property, human_only=args.human_only,
        source_labels=args.source_labels)), (ExportError,))


def cmd_ingest(args) -> int:
    from deer_reid.ingest import IngestRefused, ingest

    settings = _settings(args)
    if args.camtrap_dp and args.detections:
        print("deer-reid ingest: --camtrap-dp and --detections are two different inputs; give one", file=sys.stderr)
        return 2
    try:
        report = asyncio.run(ingest(
            api_url(settings, args.api_url), Path(args.path), site=args.site, fallback_site="default",
            camera=args.camera, captured_at=args.captured_at, wait=args.wait, timeout=args.timeout,
            concurrency=args.concurrency, progress=not args.quiet, headers=auth_headers(settings),
            max_image_bytes=settings.max_upload_bytes, detections=args.detections, min_conf=args.min_conf,
            cls=args.cls, cls_map=args.cls_map, camtrap_dp=args.camtrap_dp, taxon=args.taxon,
            prop=args.property))
    except (IngestRefused, FileNotFoundError) as exc:
        for message in getattr(exc, "messages", [str(exc)])[:50]:
            print(f"deer-reid ingest: refused: {message}", file=sys.stderr)
        return 2
    text = json.dumps(report, indent=2, default=str)
    if args.json:
        Path(args.json).write_text(text)
    source = report.get("megadetector") or report.get("camtrap_dp") or {}
    refused = source.get("refused_entries", []) + source.get("refused_rows", [])
    summary = {k: v for k, v in report.items() if k != "rejected"}
    summary["rejected"] = len(report["rejected"])
    for key in ("megadetector", "camtrap_dp"):
        if key in summary:
            summary[key] = {k: (len(v) if k.startswith("refused") else v) for k, v in summary[key].items()
                            if k != "images_without_entry_first"}
    print(json.dumps(summary, indent=2))
    for r in report["rejected"][:10]:
        print(f"rejected {r['path']}: {r['status']} {r['error']}", file=sys.stderr)
    for message in refused[:20]:
        print(f"refused {message}", file=sys.stderr)
    unfinished = args.wait and report.get("terminal", 0) < report["submitted"]
    # a script around ingest must tell a clean run from one that left something behind
    return 1 if report["rejected"] or refused or unfinished else 0


def cmd_eval(args) -> int:
    from deer_reid.evaluation.dataset import DatasetError
    from deer_reid.evaluation.run import run_loo, run_open_set

    settings = _settings(args)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report_dir = Path(args.report) if args.report else Path("reports") / f"eval-{args.protocol}-{stamp}"
    try:
        if args.protocol == "loo":
            result = run_loo(Path(args.data_dir), mode=args.mode, body_model=args.body_model, limit=args.limit,
                             seed=args.seed, report_dir=report_dir, json_path=args.json,
                             target_false_merge=args.target_false_merge, calibration_out=args.calibration_out,
                             settings=settings, allow_random=args.allow_random_weights, progress=not args.quiet,
                             holdout_of=args.holdout_of, max_review=args.max_review, coat=args.coat,
                             coat_shortlist=args.coat_shortlist, antler=args.antler,
                             antler_ignore_cut=args.antler_ignore_cut, pose=args.pose,
                             viewpoint_model=args.viewpoint_model)
        else:
            from deer_reid.stack import read_state

            state = read_state(settings.home) or {}
            stack_models = [m for m in [state.get("body_model"), *(state.get("body_ensemble") or [])] if m]
        if args.protocol == "census" and args.offline:
            from deer_reid.evaluation.census_offline import run_census_offline

            result = run_census_offline(Path(args.data_dir), body_model=args.body_model, limit=args.limit,
                                        seed=args.seed, budget=args.budget, reviewer_error=args.reviewer_error,
                                        recluster_every=args.recluster_every, settings=settings,
                                        report_dir=report_dir, json_path=args.json, progress=not args.quiet,
                                        allow_random=args.allow_random_weights, coat=args.coat)
        elif args.protocol == "census":
            from deer_reid.evaluation.census import run_census

            result = run_census(Path(args.data_dir), mode=args.mode, body_model=args.body_model, limit=args.limit,
                                seed=args.seed, api_url=api_url(settings, args.api_url), report_dir=report_dir,
                                json_path=args.json, budget=args.budget, reviewer_error=args.reviewer_error,
                                recluster_every=args.recluster_every, baseline=not args.no_baseline,
                                progress=not args.quiet, settings=settings, stack_models=stack_models)
        elif args.protocol == "open-set":
            result = run_open_set(Path(args.data_dir), mode=args.mode, body_model=args.body_model, limit=args.limit,
                                  seed=args.seed, api_url=api_url(settings, args.api_url), report_dir=report_dir,
                                  json_path=args.json, progress=not args.quiet, settings=settings,
                                  stack_models=stack_models, sightings=args.sightings, review=args.review)
    except (DatasetError, ValueError, KeyError, RuntimeError) as exc:
        print(f"deer-reid eval: {exc}", file=sys.stderr)
        return 2
    if args.protocol == "loo" and args.install:
        installed = _api(args, "POST", "/v1/calibration", json=result.pop("_artifact"))
        result["calibration"]["installed_id"] = installed["id"]
    result.pop("_artifact", None)
    skip = {"cmc", "ablation", "ablation_same_viewpoint", "calibration", "plots", "levers", "census_now"}
    print(json.dumps({k: v for k, v in result.items() if k not in skip}, indent=2, default=str))
    if "ablation" in result:
        print("\nablation (loo):")
        for name, a in result["ablation"].items():
            print(f"  {name:45s} queries {a['queries']:5d}  top-1 {a['top1']:.3f}  top-5 {a['top5']:.3f}  "
                  f"mAP {a['mAP']:.3f}")
    for name, a in (result.get("levers") or {}).items():
        print(f"  lever: {name:52s} queries {a['queries']:5d}  top-1 {a['top1']:.3f}  top-5 {a['top5']:.3f}  "
              f"mAP {a['mAP']:.3f}")
    if "calibration" in result:
        c = result["calibration"]
        print(f"\nthresholds (fit on {c['fit']['identities']} identities): match {c['thresholds']['match']:.3f}, "
              f"new {c['thresholds']['new']:.3f}; artifact {c['artifact']}")
        parts = [("fit", c["fit"]["report"]), ("held_out", c["held_out"]["report"]),
                 ("sighting", c["held_out"]["with_sightings"]), ("before", c["before"]["held_out"])]
        for part, r in parts:
            print(f"  {part:8s} B3 P/R/F1 {r['bcubed_precision']:.3f}/{r['bcubed_recall']:.3f}/{r['bcubed_f1']:.3f}"
                  f"  false-merge {r['false_merge_rate']:.3f}  false-split {r['false_split_rate']:.3f}"
                  f"  review {r['review_rate']:.3f}  individuals {r['predicted_individuals']}/{r['true_individuals']}")
    print(f"\nreport: {report_dir / 'report.md'}")
    return 0


def cmd_bench(args) -> int:
    from deer_reid.bench import precision_check, run_bench
    from deer_reid.stack import with_jemalloc

    env = with_jemalloc(dict(os.environ))
    if env.get("LD_PRELOAD") != os.environ.get("LD_PRELOAD"):
        # The bare measurement runs under the same allocator as the services it is compared with.
        # its own arguments, not sys.argv: called as main([...]) from a script or a test, those differ
        os.execve(sys.executable, [sys.executable, "-m", "deer_reid.cli", *args.argv], env)

    settings = _settings(args)
    if args.census:
        from deer_reid.census_bench import census_bench

        result = census_bench(args.census, progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    if args.gallery:
        from deer_reid.gallery_bench import gallery_bench

        result = gallery_bench(args.gallery, k=settings.candidates_k, queries=args.gallery_queries,
                               per_individual=settings.exemplars_per_individual,
                               progress=lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    if args.precision_check:
        names = [n.strip() for n in (args.body_model or "efficientnet_lite0").split(",")]
        result = precision_check(Path(args.precision_check), names, settings)
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2))
        return 0
    result = run_bench(args.mode, args.detections, settings, body_model=args.body_model,
                       progress=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return 0


def cmd_keys(args) -> int:
    """API keys live in the database: managing them needs the database, not a key."""
    from services.api import auth
    from shared.db import create_pool

    settings = _settings(args)

    async def run():
        pool = await create_pool(database_url_for(settings), max_size=1)
        try:
            if args.action == "create":
                key_id, token = await auth.create_key(pool, args.owner, args.scope)
                print(f"key {key_id} for {args.owner} ({args.scope}); it is shown once, keep it now:\n{token}")
            elif args.action == "list":
                print(f"{'id':>4s} {'prefix':9s} {'owner':24s} {'scope':7s} {'created':20s} {'last used':20s} revoked")
                for k in await auth.list_keys(pool):
                    def t(v):
                        return v.strftime("%Y-%m-%d %H:%M:%S") if v else "-"
                    print(f"{k['id']:>4d} {k['prefix']:9s} {k['owner'][:24]:24s} {k['scope']:7s} {t(k['created_at']):20s} "
                          f"{t(k['last_used_at']):20s} {t(k['revoked_at'])}")
            elif not await auth.revoke_key(pool, args.id):
                raise SystemExit(f"deer-reid keys: no unrevoked key {args.id}")
            else:
                print(f"key {args.id} revoked")
        finally:
            await pool.close()

    try:
        asyncio.run(run())
    except ValueError as exc:
        print(f"deer-reid keys: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_page(args) -> int:
    """The page's address, signed in with the local key (the key travels in the fragment, never to a log)."""
    from urllib.parse import quote

    settings = _settings(args)
    url = api_url(settings, args.api_url) + "/ui/login"
    key = api_key(settings)
    print(f"{url}#key={quote(key)}" if key else url)
    return 0


def cmd_export(args) -> int:
    import io
    import zipfile

    params = {"format": args.format, "scientific_name": args.scientific_name}
    if args.property:
        params["property"] = args.property
    data = _api(args, "GET", "/v1/export", params=params)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        z.extractall(out)
        names = z.namelist()
    print(f"wrote {', '.join(names)} to {out}")
    if args.with_media:
        if args.format != "camtrap-dp":
            print("deer-reid export: --with-media goes with --format camtrap-dp", file=sys.stderr)
            return 2
        import csv

        with open(out / "media.csv", newline="") as f:
            media = list(csv.DictReader(f))
        for row in media:  # one image at a time: a season's photos never sit in memory together
            target = out / row["filePath"]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(_api(args, "GET", f"/v1/images/{row['mediaID']}"))
        print(f"wrote {len(media)} images under {out / 'media'}")
    return 0


def _name(ind: dict, key: str = "id") -> str:
    return f"{ind.get('name')} (#{ind[key]})" if ind.get("name") else f"#{ind[key]}"


def _print_change(change: dict) -> None:
    moved = change["after"]["detections"]
    founded = change["after"].get("founded")
    print(f"change {change['audit_id']}: {change['action']}, {len(moved)} detection(s)"
          + (f", founded #{founded}" if founded else "") + f"  (undo: deer-reid review undo {change['audit_id']})")


def cmd_individuals(args) -> int:
    if args.action == "list":
        params = {k: v for k, v in (("q", args.q), ("property", args.property), ("site", args.site),
                                    ("min_sightings", args.min_sightings), ("limit", args.limit)) if v}
        found = _api(args, "GET", "/v1/individuals", params=params)
        print(f"{found['total']} individuals")
        for i in found["individuals"]:
            print(f"{_name(i):32s} {i['sightings']:>5d} sightings  {i['sex']:7s} {i['first_seen'][:10]} .. "
                  f"{i['last_seen'][:10]}  {','.join(i['sites'])[:40]}  {' '.join(i['tags'])}")
    elif args.action == "show":
        p = _api(args, "GET", f"/v1/individuals/{args.id}")
        if args.json:
            print(json.dumps(p, indent=2))
            return 0
        print(f"{_name(p)}  {p['sightings']} sightings, {p['sex']}, {p['first_seen'][:10]} .. {p['last_seen'][:10]}"
              + (f"  (merged into #{p['merged_into']})" if p["merged_into"] else ""))
        if p["tags"] or p["notes"]:
            print(f"tags: {', '.join(p['tags'])}\nnotes: {p['notes']}")
        print("sites: " + ", ".join(f"{s['site']} ({s['sightings']})" for s in p["sites"]))
        print("hours: " + " ".join(f"{h}:{n}" for h, n in enumerate(p["hours"]) if n))
        for s in p["similar"]:
            parts = ", ".join(f"{k} {v:.3f}" for k, v in s["components"].items())
            print(f"similar: {_name(s, 'individual_id')} {s['score']:.3f} ({parts})")
        for t in p["timeline"][:args.limit]:
            print(f"  {t['captured_at'][:19]} {t['site']:16s} {t['detection']} {t['viewpoint']:12s} "
                  f"by {t['decided_by']}")
    elif args.action == "name":
        body = {"name": args.name or None, "reason": args.reason}
        if args.tags is not None:
            body["tags"] = [t for t in args.tags.split(",") if t.strip()]
        if args.notes is not None:
            body["notes"] = args.notes
        _print_change(_api(args, "PATCH", f"/v1/individuals/{args.id}", json=body))
    elif args.action == "merge":
        _print_change(_api(args, "POST", "/v1/individuals/merge",
                           json={"keep": args.keep, "absorb": args.absorb, "reason": args.reason}))
    elif args.action == "split":
        _print_change(_api(args, "POST", f"/v1/individuals/{args.id}/split",
                           json={"detections": args.detections, "reason": args.reason, "name": args.name}))
    return 0


def cmd_review(args) -> int:
    if args.action in ("list", "next"):
        queue = _api(args, "GET", "/v1/review", params={"order": args.order, "limit": 1 if args.action == "next"
                                                        else args.limit})
        print(f"{queue['total']} waiting ({queue['order']} first)")
        for item in queue["items"]:
            print(f"{item['detection']}  {item['captured_at'][:19]} {item['site']}/{item['camera']} {item['cls']} "
                  f"{item['state']}  flags: {', '.join(item['flags'])}")
            for rank, c in enumerate(item["candidates"], 1):
                parts = ", ".join(f"{k} {v['raw']:.3f}" for k, v in c["components"].items() if v["raw"] is not None)
                print(f"   {rank}. {_name(c, 'individual_id'):28s} score {c['score']:.3f}  {c.get('sightings', 0)} "
                      f"sightings  ({parts})")
    elif args.action in ("confirm", "assign", "new"):
        body = {"action": args.action, "individual_id": args.individual, "reason": args.reason}
        path = "reassign" if args.reassign else "decision"
        _print_change(_api(args, "POST", f"/v1/detections/{args.detection}/{path}", json=body))
    elif args.action == "undo":
        _print_change(_api(args, "POST", f"/v1/audit/{args.audit_id}/undo", json={"reason": args.reason}))
    elif args.action == "log":
        for e in _api(args, "GET", "/v1/audit", params={"limit": args.limit})["entries"]:
            state = f"undone by {e['undone_by']}" if e["undone_by"] else ""
            print(f"{e['id']:>5d} {e['at'][:19]} {e['actor'][:20]:20s} {e['action']:16s} "
                  f"{len(e['after']['detections']):>4d} det  {e['reason'][:40]:40s} {state}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deer-reid", description="Re-identification of individual deer.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--home", type=Path, help="state directory of the embedded stack (DEER_HOME)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **k: _add(*a, parents=[common], **k)
    # `deer-reid review list --home H` as well as `deer-reid review --home H list`: SUPPRESS, so that an
    # action that is not given --home keeps the command's value instead of resetting it
    nested = argparse.ArgumentParser(add_help=False)
    nested.add_argument("--home", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    def actions(parser: argparse.ArgumentParser) -> argparse._SubParsersAction:
        group = parser.add_subparsers(dest="action", required=True)
        add = group.add_parser
        group.add_parser = lambda *a, **k: add(*a, parents=[nested], **k)
        return group

    up = sub.add_parser("up", help="start the embedded stack: PostgreSQL, broker, services, API")
    up.add_argument("--detach", action="store_true", help="return once every service is healthy")
    up.add_argument("--body-model", help="fast-mode body model by registry name, e.g. efficientnet_lite0")
    up.add_argument("--body-ensemble", help="enhanced-mode body models, comma-separated, e.g. "
                    "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    up.add_argument("--allow-random-weights", action="store_true",
                    help="run models without weights on random initialisation (results are flagged)")
    up.add_argument("--api-port", type=int)
    up.add_argument("--timeout", type=float, default=300, help="seconds --detach waits for health")
    up.set_defaults(func=cmd_up)

    down = sub.add_parser("down", help="stop the stack started by `up`")
    down.set_defaults(func=cmd_down)

    status = sub.add_parser("status", help="print the running stack's state")
    status.set_defaults(func=cmd_status)

    bk = sub.add_parser("backup", help="save the whole state (database, images, trained models) into a new "
                        "folder, consistently, while the stack runs")
    bk.add_argument("out")
    bk.add_argument("--property", help="only this property: its sites, images, detections, individuals, people's "
                    "decisions, audit log and identity graph (restores into an empty home)")
    bk.set_defaults(func=cmd_backup)
    rs = sub.add_parser("restore", help="bring a backup back into an empty DEER_HOME (checksums first; newer "
                        "migrations applied after)")
    rs.add_argument("backup")
    rs.add_argument("--force", action="store_true", help="replace a home that is not empty")
    rs.set_defaults(func=cmd_restore)

    doc = sub.add_parser("doctor", help="check what a working install needs, each item with its fix "
                         "(exit 1 when the default run cannot work)")
    doc.set_defaults(func=cmd_doctor)

    mig = sub.add_parser("migrate", help="apply migrations and create topics on DEER_DATABASE_URL / DEER_KAFKA_BOOTSTRAP")
    mig.set_defaults(func=cmd_migrate)

    so = sub.add_parser("soak", help="drive the running stack with N distinct detections (optionally with faults) "
                        "and account for every one")
    so.add_argument("detections", type=int)
    so.add_argument("--photos", required=True, help="a folder of real photos the distinct images are made from")
    so.add_argument("--rate", type=float, help="detections per second (default: all at once, one backlog)")
    so.add_argument("--faults", action="store_true",
                    help="SIGKILL each service once, the broker and the embedded PostgreSQL, spread out")
    so.add_argument("--concurrency", type=int, default=4)
    so.add_argument("--timeout", type=float, default=86400, help="give up waiting for decisions after this")
    so.add_argument("--seed", type=int)
    so.add_argument("--json")
    so.add_argument("--quiet", action="store_true")
    so.set_defaults(func=cmd_soak)

    k8 = sub.add_parser("k8s", help="write the Kubernetes manifests (Deployments, Services, KEDA ScaledObjects)")
    k8.add_argument("--out", default="deploy/k8s")
    k8.set_defaults(func=cmd_k8s)

    da = sub.add_parser("dashboard", help="write the Grafana dashboard (a row per service)")
    da.add_argument("--out", default="deploy/grafana/dashboards/deer-reid.json")
    da.set_defaults(func=cmd_dashboard)

    ev = sub.add_parser("eval", help="measure re-identification accuracy on a labelled folder")
    ev.add_argument("data_dir", help="folder with metadata.csv (path, identity[, viewpoint, encounter, ...])")
    ev.add_argument("--protocol", choices=("loo", "open-set", "census"), required=True,
                    help="loo: retrieval and the fitted fusion; open-set: the running stack's online decisions; "
                    "census: the identity graph with the labels answering its questions (and today's way beside it)")
    ev.add_argument("--budget", type=int, default=1000, help="census: the most answers the labels give")
    ev.add_argument("--reviewer-error", type=float, default=0.02, help="census: how often the reviewer is wrong "
                    "(seeded)")
    ev.add_argument("--recluster-every", type=int, default=10, help="census: answers between re-solves")
    ev.add_argument("--no-baseline", action="store_true", help="census: skip today's way (the review queue) "
                    "on copies of the photos")
    ev.add_argument("--offline", action="store_true", help="census: the census's own rules without the stack, "
                    "on the photos' body similarities (seconds: a proxy for designing the rules, no baseline)")
    ev.add_argument("--mode", choices=("fast", "enhanced"), default="fast")
    ev.add_argument("--body-model", help="body model(s), comma-separated for an ensemble")
    ev.add_argument("--json", help="write the full result here")
    ev.add_argument("--report", help="folder for report.md and the plots (default reports/eval-...)")
    ev.add_argument("--limit", type=int, help="use whole identities (seeded) up to this many images")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--target-false-merge", type=float, default=0.02)
    ev.add_argument("--max-review", type=float, help="loo: prefer thresholds that send at most this share of "
                    "detections to review (given way when no point also meets the false-merge target)")
    ev.add_argument("--calibration-out", type=Path, help="where to write the calibration artifact "
                    "(default $DEER_HOME/calibration.json)")
    ev.add_argument("--install", action="store_true", help="loo: also install the artifact in the running "
                    "stack (fusion uses it from its next batch); same as `deer-reid calibration install`")
    ev.add_argument("--holdout-of", metavar="NAME", help="loo: only the identities trained model NAME held out "
                    "(to compare models on the same animals); trained models' own identities are always left out")
    ev.add_argument("--coat", action="store_true", help="loo: add the coat service's components (colour, "
                    "markings, pattern matching) and measure each, and all fused; census --offline: with them")
    ev.add_argument("--coat-shortlist", type=int, metavar="K", help="loo --coat: gallery photos each photo's coat "
                    "is compared with, its K closest by body (default: the service's DEER_COAT_SHORTLIST)")
    ev.add_argument("--sightings", action="store_true", help="open-set: upload each encounter as one sighting "
                    "(the sighting protocol; reported as such)")
    ev.add_argument("--pose", action="store_true", help="loo: add the pose-aware component (body similarity to "
                    "photos of the same viewpoint, as the pose service's viewpoint classifier predicts it)")
    ev.add_argument("--viewpoint-model", metavar="NAME", help="the viewpoint classifier to measure (where the data "
                    "has a viewpoint column) and to compare with under --pose (default DEER_POSE_VIEWPOINT_MODEL)")
    ev.add_argument("--antler", action="store_true", help="loo: the males only (DATA/sex.csv), with the antler "
                    "service's fingerprint as a component (on nyala: horns, which are not antlers)")
    ev.add_argument("--antler-ignore-cut", action="store_true", help="with --antler: fingerprint racks that run into "
                    "the photo's top edge too (the service gives them no evidence)")
    ev.add_argument("--review", action="store_true", help="open-set: then work the review queue with the labels as "
                    "the reviewer, and report how often the right individual was among the page's top 3")
    ev.add_argument("--allow-random-weights", action="store_true")
    ev.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="as the body service (default auto)")
    ev.add_argument("--api-url")
    ev.add_argument("--quiet", action="store_true")
    ev.set_defaults(func=cmd_eval)

    be = sub.add_parser("bench", help="body throughput: bare models vs the whole pipeline, in one run")
    be.add_argument("--mode", choices=("fast", "enhanced"), default="fast")
    be.add_argument("--detections", type=int, default=512)
    be.add_argument("--body-model", help="override the mode's models (comma-separated)")
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
    be.set_defaults(func=cmd_bench)

    si = sub.add_parser("sites", help="camera sites and the property (population) each belongs to")
    si_sub = actions(si)
    si_add = si_sub.add_parser("add", help="register a site, or move one that has no detections yet")
    si_add.add_argument("name")
    si_add.add_argument("--property", default="default", help="the population it belongs to (default: default)")
    si_add.add_argument("--lat", type=float, help="latitude (temporal conflicts need coordinates)")
    si_add.add_argument("--lon", type=float)
    si_list = si_sub.add_parser("list", help="every site with its property, coordinates and detections")
    for p in (si_add, si_list):
        p.add_argument("--api-url")
    si.set_defaults(func=cmd_sites)

    ce = sub.add_parser("census", help="the identity graph: re-cluster a property, or see where its census stands")
    ce_sub = actions(ce)
    ce_re = ce_sub.add_parser("recluster", help="re-solve the property's identity graph now and wait for the run")
    ce_re.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the census service")
    ce_st = ce_sub.add_parser("status", help="individuals, questions left, answers, the calibration in force")
    for p in (ce_re, ce_st):
        p.add_argument("--property", default="default")
        p.add_argument("--api-url")
    ce.set_defaults(func=cmd_census)

    ga = sub.add_parser("gallery", help="the gallery of exemplars")
    ga_sub = actions(ga)
    ga_re = ga_sub.add_parser("rebuild", help="re-choose every individual's exemplars")
    ga_re.add_argument("--property", help="only this property")
    ga_re.add_argument("--quiet", action="store_true")
    ga.set_defaults(func=cmd_gallery)

    ca = sub.add_parser("calibration", help="the fitted fusion that fusion applies")
    ca_sub = actions(ca)
    ca_in = ca_sub.add_parser("install", help="make an artifact written by `eval --protocol loo` the active one")
    ca_in.add_argument("file")
    ca_show = ca_sub.add_parser("show", help="print the active artifact")
    for p in (ca_in, ca_show):
        p.add_argument("--api-url")
    ca.set_defaults(func=cmd_calibration)

    tr = sub.add_parser("train", help="fine-tune a body network on labelled photos (metric learning)")
    tr.add_argument("data_dir", help="folder with metadata.csv (path, identity[, viewpoint, encounter])")
    tr.add_argument("--name", required=True, help="the new model's name (then --body-model NAME)")
    tr.add_argument("--base", default="efficientnet_lite0", help="efficientnet_lite0|1|2 (ImageNet weights)")
    tr.add_argument("--epochs", type=int, default=12)
    tr.add_argument("--input-size", type=int, default=224)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--holdout-identities", type=int, default=58,
                    help="identities neither trained on nor used to choose the epoch (eval reports on them)")
    tr.add_argument("--validation-identities", type=int, help="identities that choose the epoch (default 15)")
    tr.add_argument("--folds", type=int, default=0, metavar="K",
                    help="choose the epoch by K-fold cross-validation over every identity not held out, then train "
                    "on all of them (instead of --validation-identities)")
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--lr", type=float, default=3e-4)
    tr.add_argument("--average-from", type=int, default=0, help="average the weights of every epoch from this one "
                    "on (BN recomputed); kept only if it beats the best epoch on validation (0: off)")
    tr.add_argument("--erase", type=float, default=0.0, metavar="P",
                    help="random erasing: the share of training images with one rectangle of noise (0: off)")
    tr.add_argument("--distill", type=float, default=0.0, metavar="W",
                    help="weight of the cosine distance to the frozen ImageNet network's embedding (0: off)")
    tr.add_argument("--subcenters", type=int, default=3, metavar="K",
                    help="ArcFace centres per class (1: plain ArcFace)")
    tr.add_argument("--refit", action="store_true", help="once validation has chosen the epoch, train again on "
                    "training + validation identities for that many epochs (the holdout stays unseen)")
    tr.add_argument("--precision", choices=("auto", "fp32", "bf16"), help="default fp32 (bf16 measured no faster)")
    tr.add_argument("--overwrite", action="store_true", help="replace a trained model of the same name")
    tr.add_argument("--resume", action="store_true", help="continue from the last epoch's checkpoint")
    tr.add_argument("--json", help="write the model card here too")
    tr.add_argument("--quiet", action="store_true")
    tr.set_defaults(func=cmd_train)

    tv = sub.add_parser("train-viewpoint", help="(deer-reid train viewpoint DATA_DIR) the pose service's viewpoint "
                        "classifier, from labelled viewpoints")
    tv.add_argument("data_dir", help="folder with metadata.csv (path, identity, viewpoint[, encounter])")
    tv.add_argument("--name", default="viewpoint", help="the classifier's name in the model cache "
                    "(the pose service's DEER_POSE_VIEWPOINT_MODEL)")
    tv.add_argument("--backbone", default="efficientnet_lite0", help="body network whose features it reads")
    tv.add_argument("--seed", type=int, default=0)
    tv.add_argument("--holdout-identities", type=int, default=58, help="identities it never sees (its figures)")
    tv.add_argument("--validation-identities", type=int, default=15,
                    help="identities that choose its regularisation and its `unknown` threshold")
    tv.add_argument("--target-accuracy", type=float, default=0.95,
                    help="accuracy of answered predictions on validation; less confident answers are `unknown`")
    tv.add_argument("--overwrite", action="store_true")
    tv.add_argument("--json", help="write the card here too")
    tv.add_argument("--quiet", action="store_true")
    tv.set_defaults(func=cmd_train_viewpoint)

    ts = sub.add_parser("train-soup", help="(deer-reid train soup NAME --from A B ...) one network averaging the "
                        "weights of fine-tunes of one split, chosen greedily on validation")
    ts.add_argument("name", help="the soup's name in the model cache (then --body-model NAME)")
    ts.add_argument("--from", dest="ingredients", nargs="+", required=True, metavar="MODEL",
                    help="models trained by `deer-reid train` with the same base, input size, data and split")
    ts.add_argument("--overwrite", action="store_true", help="replace a model of the same name")
    ts.add_argument("--json", help="write the card here too")
    ts.add_argument("--quiet", action="store_true")
    ts.set_defaults(func=cmd_train_soup)

    ex = sub.add_parser("export-labels", help="decided detections as a folder `train` accepts")
    ex.add_argument("out")
    ex.add_argument("--property", help="only this property")
    ex.add_argument("--human-only", action="store_true", help="only what a person decided")
    ex.add_argument("--source-labels", action="store_true",
                    help="the labels the photos came with (Camtrap DP individualID) as the identities")
    ex.set_defaults(func=cmd_export_labels)

    ing = sub.add_parser("ingest", help="upload a folder (recursively), one image, or a zip or tar archive "
                         "(entries read one at a time; refused entries are reported, the rest go on)")
    ing.add_argument("path")
    ing.add_argument("--site", help="camera site of the images (its property is looked up: `deer-reid sites`); "
                     "default: from SITE_YYYYMMDD_HHMMSS file names, else 'default'")
    ing.add_argument("--camera")
    ing.add_argument("--captured-at", help="ISO-8601 time for images whose own time cannot be read")
    ing.add_argument("--detections", type=Path, metavar="MD_JSON",
                     help="MegaDetector batch output for the folder: animal boxes become detections, people and "
                     "vehicles are never uploaded, images without an animal box are skipped")
    ing.add_argument("--min-conf", type=float, default=0.2, help="with --detections: the least confidence of an "
                     "animal box (MegaDetector's typical threshold; default 0.2)")
    ing.add_argument("--cls", default="unknown", choices=[c.value for c in DetectionClass],
                     help="class of every detection (antlered or not, as far as it is known)")
    ing.add_argument("--cls-map", type=Path, metavar="CSV",
                     help="with --detections: a CSV of file,cls giving each image's class (beats --cls)")
    ing.add_argument("--camtrap-dp", action="store_true",
                     help="PATH is a Camtrap DP 1.0.2 data package: deployments become sites and cameras, media "
                     "with boxed observations become uploads, eventID the sighting, individualID a label")
    ing.add_argument("--taxon", help="with --camtrap-dp: only observations of this scientificName")
    ing.add_argument("--property", default="default", help="with --camtrap-dp: the property of its sites")
    ing.add_argument("--wait", action="store_true", help="wait until every detection is terminal")
    ing.add_argument("--json", help="write the report here")
    ing.add_argument("--timeout", type=float, help="give up waiting after this many seconds")
    ing.add_argument("--concurrency", type=int, default=4)
    ing.add_argument("--api-url")
    ing.add_argument("--quiet", action="store_true", help="no progress bars")
    ing.set_defaults(func=cmd_ingest)

    ke = sub.add_parser("keys", help="API keys: create, list, revoke (needs the database, as an administrator)")
    ke_sub = actions(ke)
    ke_new = ke_sub.add_parser("create", help="a new key, printed once")
    ke_new.add_argument("--owner", required=True, help="who uses it: the audit log records this name")
    ke_new.add_argument("--scope", choices=["read", "review", "admin"], default="review")
    ke_sub.add_parser("list", help="every key (hashes only are stored)")
    ke_rev = ke_sub.add_parser("revoke")
    ke_rev.add_argument("id", type=int)
    ke.set_defaults(func=cmd_keys)

    pg = sub.add_parser("page", help="print the web page's address, with a link that signs in with the local key")
    pg.add_argument("--api-url")
    pg.set_defaults(func=cmd_page)

    xp = sub.add_parser("export", help="individuals, detections and sightings as CSV tables or a Camtrap DP package")
    xp.add_argument("out", help="folder to write into")
    xp.add_argument("--format", choices=["csv", "camtrap-dp"], default="csv")
    xp.add_argument("--property", help="only this property")
    xp.add_argument("--scientific-name", default="Cervidae", help="Camtrap DP: the taxon of the animals")
    xp.add_argument("--with-media", action="store_true",
                    help="Camtrap DP: write the images too, at each media row's filePath (a package another "
                    "stack can ingest with `deer-reid ingest OUT --camtrap-dp`)")
    xp.add_argument("--api-url")
    xp.set_defaults(func=cmd_export)

    iv = sub.add_parser("individuals", help="browse, name, merge and split individuals")
    iv_sub = actions(iv)
    iv_list = iv_sub.add_parser("list")
    iv_list.add_argument("--q", help="name, tag, note or id")
    iv_list.add_argument("--property")
    iv_list.add_argument("--site")
    iv_list.add_argument("--min-sightings", type=int)
    iv_list.add_argument("--limit", type=int, default=50)
    iv_show = iv_sub.add_parser("show")
    iv_show.add_argument("id", type=int)
    iv_show.add_argument("--limit", type=int, default=20, help="sightings to print")
    iv_show.add_argument("--json", action="store_true")
    iv_name = iv_sub.add_parser("name", help="name, tags and notes")
    iv_name.add_argument("id", type=int)
    iv_name.add_argument("name", nargs="?", default="", help="empty removes the name")
    iv_name.add_argument("--tags", help="comma-separated; replaces the tags")
    iv_name.add_argument("--notes")
    iv_merge = iv_sub.add_parser("merge", help="KEEP absorbs ABSORB's sightings")
    iv_merge.add_argument("keep", type=int)
    iv_merge.add_argument("absorb", type=int)
    iv_split = iv_sub.add_parser("split", help="the given detections of ID become a new individual")
    iv_split.add_argument("id", type=int)
    iv_split.add_argument("detections", nargs="+")
    iv_split.add_argument("--name")
    for p in (iv_name, iv_merge, iv_split):
        p.add_argument("--reason", default="")
    for p in (iv_list, iv_show, iv_name, iv_merge, iv_split):
        p.add_argument("--api-url")
    iv.set_defaults(func=cmd_individuals)

    rv = sub.add_parser("review", help="work the review queue; undo changes")
    rv_sub = actions(rv)
    rv_list = rv_sub.add_parser("list")
    rv_list.add_argument("--limit", type=int, default=20)
    rv_next = rv_sub.add_parser("next", help="the first detection waiting, with its candidates")
    for p in (rv_list, rv_next):
        p.add_argument("--order", choices=["oldest", "uncertain"], default="oldest")
    rv_confirm = rv_sub.add_parser("confirm", help="the individual fusion suggested (or --individual among them)")
    rv_assign = rv_sub.add_parser("assign", help="another individual")
    rv_new = rv_sub.add_parser("new", help="a new individual")
    for p in (rv_confirm, rv_assign, rv_new):
        p.add_argument("detection")
        p.add_argument("--reassign", action="store_true", help="override a person's earlier decision")
        p.add_argument("--reason", default="")
        p.set_defaults(individual=None)
    rv_confirm.add_argument("--individual", type=int)
    rv_assign.add_argument("individual", type=int)
    rv_undo = rv_sub.add_parser("undo")
    rv_undo.add_argument("audit_id", type=int)
    rv_undo.add_argument("--reason", default="")
    rv_log = rv_sub.add_parser("log", help="the newest changes by people")
    rv_log.add_argument("--limit", type=int, default=30)
    for p in (rv_list, rv_next, rv_confirm, rv_assign, rv_new, rv_undo, rv_log):
        p.add_argument("--api-url")
    rv.set_defaults(func=cmd_review)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["train", "viewpoint"]:
        # `train DATA_DIR` fine-tunes a body network; `train viewpoint DATA_DIR` fits the viewpoint classifier
        argv[:2] = ["train-viewpoint"]
    elif argv[:2] == ["train", "soup"]:
        argv[:2] = ["train-soup"]
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a command that re-executes itself (bench) passes on
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
