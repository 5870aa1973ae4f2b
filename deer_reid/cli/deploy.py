"""k8s and dashboard: write the deployment files (Kubernetes manifests, the Grafana dashboard)."""
from __future__ import annotations

from pathlib import Path

from deer_reid.cli.parsing import add_command


def register(commands) -> None:
    k8 = add_command(commands, "k8s", cmd_k8s,
                     help="write the Kubernetes manifests (Deployments, Services, KEDA ScaledObjects)")
    k8.add_argument("--out", default="deploy/k8s")
    da = add_command(commands, "dashboard", cmd_dashboard, help="write the Grafana dashboard (a row per service)")
    da.add_argument("--out", default="deploy/grafana/dashboards/deer-reid.json")


def cmd_k8s(args) -> int:
    from deer_reid.k8s import write

    for path in write(Path(args.out)):
        print(path)
    return 0


def cmd_dashboard(args) -> int:
    from deer_reid.dashboard import write

    print(write(Path(args.out)))
    return 0
