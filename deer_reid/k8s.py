"""Kubernetes manifests, generated from one table: `deer-reid k8s --out deploy/k8s` writes them.

Every service is a Deployment with a Service (its /metrics and /healthz port), probes on /healthz,
resource requests and the shared configuration; the extractors whose image is built for CUDA request a
GPU; each extractor is scaled by a KEDA ScaledObject on its consumer group's lag on the topic it reads.
Kafka and PostgreSQL are the operator's (managed, or their own charts): their addresses are configuration
and the database URL is a Secret the operator creates, never a file in this repository.

The files are generated rather than written by hand so that the seven Deployments cannot drift apart;
tests/test_k8s.py regenerates them, compares with the committed ones, and validates every manifest
offline against the Kubernetes and KEDA schemas.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from shared.topics import DETECTIONS, POSE_REQUESTS

NAMESPACE = "deer-reid"
APP = "deer-reid"
METRICS_PORT = 9100
API_PORT = 8080
DATABASE_SECRET = "deer-reid-database"  # kubectl create secret generic deer-reid-database --from-literal=url=...
IMAGES = {"cpu": "deer-reid", "gpu": "deer-reid-gpu", "pose": "deer-reid-pose"}  # deploy/Dockerfile{,.body,.pose}
CONFIG = {  # the settings every service shares (shared/config.py names them all)
    "DEER_KAFKA_BOOTSTRAP": "kafka:9092",
    "DEER_BODY_MODEL": "efficientnet_lite0",
    "DEER_MODEL_CACHE": "/models",
    "DEER_BLOB_DIR": "/blobs",
    "DEER_METRICS_PORT": str(METRICS_PORT),
    "DEER_METRICS_HOST": "0.0.0.0",
    # the reconciler announces joins past this deadline and fusion decides them: one value for both
    "DEER_JOIN_TIMEOUT_S": "10",
}


@dataclass(frozen=True)
class Workload:
    name: str
    image: str  # a key of IMAGES
    replicas: int
    cpu: str
    memory: str
    gpu: bool = False
    volumes: tuple[str, ...] = ()  # "blobs" (originals), "models" (the weights cache, written to)
    scale_on: str | None = None  # the topic whose consumer-group lag KEDA scales it on
    env: tuple[tuple[str, str], ...] = ()
    why: str = ""

    @property
    def port(self) -> int:
        return API_PORT if self.name == "api" else METRICS_PORT

    @property
    def group(self) -> str:
        return f"deer-{self.name}"  # shared.broker.BrokerRunner names each service's group so


WORKLOADS = (
    Workload("api", "cpu", 2, "500m", "1Gi", volumes=("blobs",),
             env=(("DEER_API_HOST", "0.0.0.0"), ("DEER_API_PORT", str(API_PORT)), ("DEER_METRICS_PORT", "0")),
             why="uploads, results and the page; /metrics on its own port"),
    Workload("reconciler", "cpu", 1, "250m", "512Mi", why="the outbox relay and the stuck-work rounds: one is enough"),
    Workload("fusion", "cpu", 1, "1", "2Gi", why="one fusion: it serialises decisions per property"),
    Workload("census", "cpu", 1, "1", "4Gi",
             why="re-clusters each property's identity graph; a season's graph and its neighbour search fit in 4 GiB"),
    Workload("body", "gpu", 1, "2", "6Gi", gpu=True, volumes=("models",), scale_on=DETECTIONS.name),
    Workload("antler", "gpu", 1, "1", "3Gi", gpu=True, volumes=("models",), scale_on=DETECTIONS.name,
             why="its fingerprint network runs on the body's CUDA image"),
    Workload("coat", "cpu", 1, "1", "2Gi", scale_on=DETECTIONS.name,
             why="colour, markings and XFeat pattern matching: CPU work under 0.1 s a crop"),
    Workload("pose", "pose", 1, "2", "4Gi", volumes=("models",), scale_on=POSE_REQUESTS.name,
             why="mmcv is built for the CPU in its image (RTMPose-m ~40 ms a crop on two cores)"),
)
PARTITIONS = {DETECTIONS.name: DETECTIONS.partitions, POSE_REQUESTS.name: POSE_REQUESTS.partitions}


def _labels(name: str) -> dict:
    return {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": APP}


def _meta(name: str, **extra) -> dict:
    return {"name": name, "namespace": NAMESPACE, "labels": _labels(name), **extra}


POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 1000}  # the images' service user
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _configuration(extra: tuple[tuple[str, str], ...] = ()) -> dict:
    """The shared ConfigMap, the database URL from the operator's Secret, and a service's own settings."""
    env = [{"name": "DEER_DATABASE_URL", "valueFrom": {"secretKeyRef": {"name": DATABASE_SECRET, "key": "url"}}}]
    return {"envFrom": [{"configMapRef": {"name": "deer-reid-config"}}],
            "env": env + [{"name": k, "value": v} for k, v in extra]}


def _container(w: Workload) -> dict:
    probe = {"httpGet": {"path": "/healthz", "port": "http"}}
    resources = {"requests": {"cpu": w.cpu, "memory": w.memory}, "limits": {"memory": w.memory}}
    if w.gpu:
        resources["requests"]["nvidia.com/gpu"] = "1"
        resources["limits"]["nvidia.com/gpu"] = "1"
    container = {
        "name": w.name,
        "image": f"{IMAGES[w.image]}:latest",
        "command": ["python", "-m", f"services.{w.name}"],
        **_configuration(w.env),
        "ports": [{"name": "http", "containerPort": w.port}],
        # Starting loads models (minutes on a cold cache): the startup probe allows 10 minutes. Readiness
        # follows /healthz (503 while the broker loop is down); liveness only asks that the process answers,
        # so a Kafka outage takes pods out of service without restarting them all.
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 120},
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 10, "failureThreshold": 6},
        "resources": resources,
        "securityContext": CONTAINER_SECURITY,
    }
    if w.volumes:
        container["volumeMounts"] = [{"name": v, "mountPath": f"/{v}"} for v in w.volumes]
    return container


def deployment(w: Workload) -> dict:
    annotations = {"prometheus.io/scrape": "true", "prometheus.io/port": str(w.port), "prometheus.io/path": "/metrics"}
    pod = {
        "securityContext": {**POD_SECURITY, "fsGroup": 1000},  # fsGroup: the volumes are writable by the user
        "terminationGracePeriodSeconds": 30,  # a broker loop commits what it flushed, then stops
        "containers": [_container(w)],
    }
    if w.volumes:
        pod["volumes"] = [{"name": v, "persistentVolumeClaim": {"claimName": f"deer-reid-{v}"}} for v in w.volumes]
    if w.gpu:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    meta = _meta(w.name)
    if w.why:
        meta["annotations"] = {"deer-reid/why": w.why}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
        "spec": {
            # KEDA owns the replicas of a scaled extractor: a re-apply must not reset them
            **({} if w.scale_on else {"replicas": w.replicas}),
            "selector": {"matchLabels": _labels(w.name)},
            # one fusion and one reconciler: never two at once during a roll-out
            "strategy": {"type": "Recreate"} if w.replicas == 1 and not w.scale_on else
            {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {"metadata": {"labels": _labels(w.name), "annotations": annotations}, "spec": pod},
        },
    }


def service(w: Workload) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(w.name),
            "spec": {"selector": _labels(w.name), "ports": [{"name": "http", "port": w.port, "targetPort": "http"}]}}


def scaled_object(w: Workload) -> dict:
    """KEDA's Kafka scaler on the service's consumer group: replicas follow the lag, at most one per partition
    (more would idle)."""
    return {
        "apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": _meta(w.name),
        "spec": {
            "scaleTargetRef": {"name": w.name},
            "minReplicaCount": 1,  # warm: a model load is minutes, a cold start would cost every first upload
            "maxReplicaCount": PARTITIONS[w.scale_on],
            "pollingInterval": 15,
            "cooldownPeriod": 300,
            "triggers": [{"type": "kafka", "metadata": {
                "bootstrapServers": CONFIG["DEER_KAFKA_BOOTSTRAP"], "consumerGroup": w.group, "topic": w.scale_on,
                "lagThreshold": "64",  # a few micro-batches of work queued per replica
                "offsetResetPolicy": "earliest"}}],
        },
    }


def manifests() -> dict[str, list[dict]]:
    """File name -> the manifests it holds, in apply order."""
    files: dict[str, list[dict]] = {
        "namespace.yaml": [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE,
                                                                                   "labels": _labels(APP)}}],
        "config.yaml": [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta("deer-reid-config"),
                         "data": dict(CONFIG)}],
        "storage.yaml": [
            {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": _meta(f"deer-reid-{name}"),
             "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": size}}}}
            for name, size in (("blobs", "500Gi"), ("models", "20Gi"))],
        "migrate.yaml": [{
            "apiVersion": "batch/v1", "kind": "Job", "metadata": _meta("deer-reid-migrate"),
            "spec": {"backoffLimit": 20, "template": {"metadata": {"labels": _labels("deer-reid-migrate")}, "spec": {
                "restartPolicy": "OnFailure",  # until Kafka and PostgreSQL answer
                "securityContext": POD_SECURITY,
                "containers": [{"name": "migrate", "image": f"{IMAGES['cpu']}:latest",
                                "command": ["deer-reid", "migrate"], **_configuration(),
                                "resources": {"requests": {"cpu": "100m", "memory": "256Mi"}},
                                "securityContext": CONTAINER_SECURITY}]}}}}],
    }
    for w in WORKLOADS:
        files[f"{w.name}.yaml"] = [deployment(w), service(w)] + ([scaled_object(w)] if w.scale_on else [])
    files["kustomization.yaml"] = [{"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
                                    "namespace": NAMESPACE, "resources": list(files),
                                    # point these at your registry: `kustomize edit set image ...`
                                    "images": [{"name": image, "newTag": "latest"} for image in IMAGES.values()]}]
    return files


HEADER = "# Generated by `deer-reid k8s --out deploy/k8s` from deer_reid/k8s.py: edit that, not this.\n"


class _Plain(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # shared dicts are written out, never as &anchors
        return True


def render(docs: list[dict]) -> str:
    return HEADER + "---\n".join(yaml.dump(d, Dumper=_Plain, sort_keys=False, width=120) for d in docs)


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in manifests().items():
        (out / name).write_text(render(docs))
        written.append(out / name)
    return written
