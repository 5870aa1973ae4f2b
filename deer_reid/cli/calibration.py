"""calibration: install or show the fitted fusion that fusion applies."""
from __future__ import annotations

import sys
from pathlib import Path

from deer_reid.cli.context import api
from deer_reid.cli.output import print_json
from deer_reid.cli.parsing import add_action, add_actions, add_command


def register(commands) -> None:
    ca = add_command(commands, "calibration", cmd_calibration, help="the fitted fusion that fusion applies")
    ca_sub = add_actions(ca)
    ca_in = add_action(ca_sub, "install", help="make an artifact written by `eval --protocol loo` the active one")
    ca_in.add_argument("file")
    ca_show = add_action(ca_sub, "show", help="print the active artifact")
    for p in (ca_in, ca_show):
        p.add_argument("--api-url")


def cmd_calibration(args) -> int:
    from shared.calibration_artifact import ArtifactError, load_file

    if args.action == "show":
        print_json(api(args, "GET", "/v1/calibration"))
        return 0
    try:
        artifact = load_file(Path(args.file))
    except ArtifactError as exc:
        print(f"deer-reid calibration: {exc}", file=sys.stderr)
        return 2
    installed = api(args, "POST", "/v1/calibration", json=artifact)
    print(f"installed calibration {installed['id']} (thresholds {artifact['thresholds']}); fusion uses it from its "
          "next batch")
    return 0
