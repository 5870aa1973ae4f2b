"""How a command group adds its commands: every command and every action under it takes --home."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

_HOME = argparse.ArgumentParser(add_help=False)
_HOME.add_argument("--home", type=Path, help="state directory of the embedded stack (DEER_HOME)")

# `deer-reid review list --home H` as well as `deer-reid review --home H list`: SUPPRESS, so that an
# action that is not given --home keeps the command's value instead of resetting it
_HOME_AFTER_ACTION = argparse.ArgumentParser(add_help=False)
_HOME_AFTER_ACTION.add_argument("--home", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)

Command = Callable[[argparse.Namespace], int]


def add_command(commands: argparse._SubParsersAction, name: str, run: Command,
                **kwargs) -> argparse.ArgumentParser:
    """A command, `deer-reid NAME` (or one of train's kinds, `deer-reid train NAME`); `run` is what it does."""
    parser = commands.add_parser(name, parents=[_HOME], **kwargs)
    parser.set_defaults(func=run)
    return parser


def add_actions(command: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The actions of a command (`deer-reid sites add`, `deer-reid sites list`), one of them required."""
    return command.add_subparsers(dest="action", required=True)


def add_action(actions: argparse._SubParsersAction, name: str, **kwargs) -> argparse.ArgumentParser:
    return actions.add_parser(name, parents=[_HOME_AFTER_ACTION], **kwargs)
