"""The deployment files, checked by what runs here (no Docker engine): they must agree with the code."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

from shared import observability

REPO = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def test_every_service_container_runs_a_real_entry_point():
    services = compose()["services"]
    for name in ("api", "reconciler", "fusion", "body", "coat", "antler", "pose"):
        command = services[name]["command"]
        assert command[:2] == ["python", "-m"], command
        module = command[2]
        assert importlib.util.find_spec(module) is not None, module
        assert importlib.util.find_spec(f"{module}.__main__") is not None, module
    assert services["migrate"]["command"] == ["deer-reid", "migrate"]


def test_volumes_are_writable_by_the_service_user_and_migrate_waits_for_a_ready_broker():
    services = compose()["services"]
    for name in ("body", "antler", "pose"):
        assert "models:/models" in services[name]["volumes"], name  # the weights cache is written to
    assert not any(v.endswith(":ro") for s in services.values() for v in s.get("volumes", [])
                   if v.split(":")[0] in ("models", "blobs"))
    for dockerfile, points in (("deploy/Dockerfile", ("/blobs", "/models")), ("deploy/Dockerfile.body", ("/models",)),
                               ("deploy/Dockerfile.pose", ("/models",))):
        text = (REPO / dockerfile).read_text()
        chown = next(line for line in text.splitlines() if "chown 1000:1000" in line)
        assert all(p in chown for p in points), dockerfile
        assert text.index("chown 1000:1000") < text.index("USER 1000"), dockerfile
    assert services["migrate"]["depends_on"]["kafka"] == {"condition": "service_healthy"}
    assert "kafka-broker-api-versions" in " ".join(services["kafka"]["healthcheck"]["test"])


def test_body_reserves_a_gpu_and_scales_by_replicas():
    body = compose()["services"]["body"]
    assert body["build"]["dockerfile"] == "deploy/Dockerfile.body"
    assert "nvidia/cuda" in (REPO / "deploy/Dockerfile.body").read_text()
    devices = body["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "replicas" in body["deploy"]


def test_configuration_is_environment_only_and_names_real_settings():
    from shared.config import Settings

    known = {f"DEER_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        for key in (service.get("environment") or {}):
            if key.startswith("DEER_"):
                assert key in known, f"{name}: {key} is not a setting"


def test_prometheus_scrapes_every_service_on_its_metrics_port():
    prom = yaml.safe_load((REPO / "deploy/prometheus.yml").read_text())
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    services = compose()["services"]
    for target in targets:
        host, port = target.split(":")
        env = services[host]["environment"]
        expected = env["DEER_API_PORT"] if host == "api" else env["DEER_METRICS_PORT"]
        assert port == str(expected), target


def test_dashboard_queries_only_metrics_the_services_export():
    from prometheus_client.metrics import MetricWrapperBase

    exported = {m.describe()[0].name for m in vars(observability).values() if isinstance(m, MetricWrapperBase)}
    dash = json.loads((REPO / "deploy/grafana/dashboards/deer-reid.json").read_text())
    names = set()
    for panel in dash["panels"]:
        for target in panel.get("targets", []):  # rows group panels and ask for nothing
            names |= set(re.findall(r"\b(deer_[a-z_]+?)(?:_bucket|_sum|_count|_total)?\b", target["expr"]))
    assert names and names <= exported, names - exported
