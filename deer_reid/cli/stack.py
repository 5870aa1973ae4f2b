"""The embedded stack's life: up, down, status; doctor (what an install needs); migrate (an external
PostgreSQL and Kafka)."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time

from deer_reid.cli.context import settings_for
from deer_reid.cli.output import print_json
from deer_reid.cli.parsing import add_command
from shared.config import Settings


def register(commands) -> None:
    up = add_command(commands, "up", cmd_up, help="start the embedded stack: PostgreSQL, broker, services, API")
    up.add_argument("--detach", action="store_true", help="return once every service is healthy")
    up.add_argument("--body-model", help="fast-mode body model by registry name, e.g. efficientnet_lite0")
    up.add_argument("--body-ensemble", help="enhanced-mode body models, comma-separated, e.g. "
                    "efficientnet_lite0,efficientnet_lite1,efficientnet_lite2")
    up.add_argument("--allow-random-weights", action="store_true",
                    help="run models without weights on random initialisation (results are flagged)")
    up.add_argument("--api-port", type=int)
    up.add_argument("--timeout", type=float, default=300, help="seconds --detach waits for health")

    add_command(commands, "down", cmd_down, help="stop the stack started by `up`")
    add_command(commands, "status", cmd_status, help="print the running stack's state")
    add_command(commands, "doctor", cmd_doctor, help="check what a working install needs, each item with its fix "
                "(exit 1 when the default run cannot work)")
    add_command(commands, "migrate", cmd_migrate,
                help="apply migrations and create topics on DEER_DATABASE_URL / DEER_KAFKA_BOOTSTRAP")


def cmd_up(args) -> int:
    from deer_reid.stack import Stack, StackError, pid_alive, read_state

    settings = settings_for(args)
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

    settings = settings_for(args)
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


def cmd_status(args) -> int:
    from deer_reid.stack import pid_alive, read_state, service_health

    settings = settings_for(args)
    state = read_state(settings.home)
    running = bool(state and pid_alive(state["supervisor_pid"]))
    if running:  # each service's own word on what it runs (the pose service: which viewpoint path, and why)
        for name, service in state.get("services", {}).items():
            service["health"] = service_health(state, name, settings.metrics_host)
    print_json({"running": running, **(state or {})})
    return 0 if running else 1


def cmd_doctor(args) -> int:
    from deer_reid.doctor import checks, report

    text, status = report(checks(settings_for(args)))
    print(text)
    return status


def cmd_migrate(args) -> int:
    """Apply the database migrations and create the topics (an external Kafka and PostgreSQL)."""
    from shared.db import migrate
    from shared.topics import ensure_topics

    settings = settings_for(args)
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
