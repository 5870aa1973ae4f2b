"""How commands print what they did: JSON on stdout, refusals on stderr."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str))


def keep_json(data, path: str | None) -> None:
    """A command's --json: the whole result written to `path`, when one was given."""
    if path:
        Path(path).write_text(json.dumps(data, indent=2, default=str))


def reported(command: str, run: Callable[[], dict], refusals: tuple[type[Exception], ...],
             refused_exit: int = 2) -> int:
    """Run a command's body: its report printed as JSON (exit 0), or its refusal on stderr (exit 2, or
    `refused_exit` where the refusal is a failure along the way rather than a refused input)."""
    try:
        report = run()
    except refusals as exc:
        print(f"deer-reid {command}: {exc}", file=sys.stderr)
        return refused_exit
    print_json(report)
    return 0
