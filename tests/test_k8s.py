"""The Kubernetes manifests: generated from deer_reid/k8s.py without drift, valid against the Kubernetes
schemas (kubernetes-validate, strict: an unknown field fails) and KEDA's ScaledObject model, and in
agreement with the code (entry points, settings, topics, consumer groups, ports)."""
from __future__ import annotations

import importlib.util
import typing
from pathlib import Path

import kubernetes_validate
import pydantic
import pytest
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject

from deer_reid import k8s
from deer_reid.stack import SERVICES
from shared.config import Settings

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "deploy" / "k8s"
K8S_VERSION = kubernetes_validate.utils.latest_version()
# the Kafka scaler's metadata keys (KEDA's pkg/scalers/kafka_scaler.go): its CRD leaves them a free map
KAFKA_SCALER_KEYS = {"bootstrapServers", "consumerGroup", "topic", "lagThreshold", "activationLagThreshold",
                     "offsetResetPolicy", "allowIdleConsumers", "scaleToZeroOnInvalidOffset", "excludePersistentLag",
                     "limitToPartitionsWithLag", "ensureEvenDistributionOfPartitions", "partitionLimitation",
                     "version", "sasl", "tls", "unsafeSsl"}


def docs() -> list[dict]:
    return [d for f in sorted(OUT.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())]


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs() if d["kind"] == kind}


def test_the_committed_manifests_are_what_the_generator_writes():
    generated = k8s.manifests()
    assert sorted(p.name for p in OUT.glob("*.yaml")) == sorted(generated)
    for name, manifests in generated.items():
        assert (OUT / name).read_text() == k8s.render(manifests), f"{name}: run `deer-reid k8s --out deploy/k8s`"


def test_every_manifest_is_valid_against_the_kubernetes_schemas():
    checked = 0
    for doc in docs():
        if doc["kind"] in ("ScaledObject", "Kustomization"):
            continue
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        checked += 1
    assert checked >= 2 * len(SERVICES) + 4
    broken = {**by_kind("Deployment")["body"]}
    broken["spec"] = {**broken["spec"], "replica": 2}  # a typo of a field: strict validation refuses it
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def unknown_fields(model: type[pydantic.BaseModel], data: dict, where: str = "") -> list[str]:
    """Keys of `data` that the model does not define, at any depth (the model alone ignores them)."""
    fields = {f.alias or name: f.annotation for name, f in model.model_fields.items()}
    found = []
    for key, value in data.items():
        if key not in fields:
            found.append(f"{where}{key}")
            continue
        for inner in _models_in(fields[key]):
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, dict):
                    found += unknown_fields(inner, item, f"{where}{key}.")
    return found


def _models_in(annotation) -> list[type[pydantic.BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, pydantic.BaseModel):
        return [annotation]
    if typing.get_origin(annotation) is dict:
        return []
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def test_scaled_objects_are_valid_keda_objects_that_scale_each_extractor_on_its_own_lag():
    from services.body.service import BodyHandler
    from services.pose.service import PoseHandler
    from shared.service import CropExtractorHandler

    reads = {"body": BodyHandler.input_topics, "coat": CropExtractorHandler.input_topics,
             "antler": CropExtractorHandler.input_topics, "pose": PoseHandler.input_topics}
    scaled = by_kind("ScaledObject")
    assert set(scaled) == set(reads)
    deployments = by_kind("Deployment")
    for name, doc in scaled.items():
        ScaledObject.model_validate(doc)
        assert unknown_fields(ScaledObject, doc) == [], name
        spec = doc["spec"]
        assert spec["scaleTargetRef"]["name"] == name and name in deployments
        assert "replicas" not in deployments[name]["spec"]  # KEDA owns them
        [trigger] = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka" and set(meta) <= KAFKA_SCALER_KEYS
        [topic] = reads[name]
        assert meta["topic"] == topic.name and meta["consumerGroup"] == f"deer-{name}"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= topic.partitions
    broken = {**scaled["body"], "spec": {**scaled["body"]["spec"], "maxReplicas": 3}}
    assert unknown_fields(ScaledObject, broken) == ["spec.maxReplicas"]


def test_deployments_agree_with_the_code():
    known = {f"DEER_{name.upper()}" for name in Settings.model_fields}
    [config] = by_kind("ConfigMap").values()
    assert set(config["data"]) <= known
    deployments = by_kind("Deployment")
    services = by_kind("Service")
    assert set(deployments) == set(SERVICES) == set(services)
    for name, d in deployments.items():
        pod = d["spec"]["template"]["spec"]
        [c] = pod["containers"]
        module = c["command"][2]
        assert c["command"][:2] == ["python", "-m"] and importlib.util.find_spec(f"{module}.__main__"), name
        env = {e["name"]: e for e in c["env"]}
        assert set(env) <= known, name
        # the database URL comes from a Secret, never a value in a manifest
        assert env["DEER_DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == k8s.DATABASE_SECRET
        assert not any("postgresql://" in str(e.get("value", "")) for e in c["env"])
        port = int(env["DEER_API_PORT"]["value"]) if name == "api" else int(config["data"]["DEER_METRICS_PORT"])
        assert c["ports"] == [{"name": "http", "containerPort": port}], name
        for probe in ("startupProbe", "readinessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, name
        assert services[name]["spec"]["ports"][0]["targetPort"] == "http"
        assert d["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
        gpu = "nvidia.com/gpu" in c["resources"]["limits"]
        assert gpu == (c["image"].split(":")[0] == k8s.IMAGES["gpu"]), name  # a GPU wherever the image has CUDA
        assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["fsGroup"] == 1000
        mounts = {m["name"] for m in c.get("volumeMounts", [])}
        assert mounts == {v["name"] for v in pod.get("volumes", [])}
    assert deployments["fusion"]["spec"]["replicas"] == 1  # one fusion
    assert {"body", "antler"} <= {n for n, d in deployments.items()
                                  if "nvidia.com/gpu" in d["spec"]["template"]["spec"]["containers"][0]["resources"]
                                  ["limits"]}
    for name in ("body", "antler", "pose"):  # the weights cache is written to
        assert {"name": "models", "mountPath": "/models"} in \
            deployments[name]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    [job] = by_kind("Job").values()
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["deer-reid", "migrate"]
    [kustomization] = [d for d in docs() if d["kind"] == "Kustomization"]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in OUT.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")
