"""The `deer-reid` command line. Each module is one group of commands and adds them with its `register`;
`main` is the console script's entry point (and `python -m deer_reid.cli`'s)."""
from __future__ import annotations

import argparse
import sys

from deer_reid.cli import (access, backup, bench, calibration, census, deploy, evaluate, export, gallery, ingest,
                           people, sites, soak, stack, train)

# in the order `deer-reid --help` lists them
GROUPS = (stack, backup, soak, deploy, evaluate, bench, sites, census, gallery, calibration, train, export, ingest,
          access, people)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deer-reid", description="Re-identification of individual deer.")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in GROUPS:
        group.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = train.default_to_body(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    args.argv = argv  # what a command that re-executes itself (bench) passes on
    return args.func(args)
