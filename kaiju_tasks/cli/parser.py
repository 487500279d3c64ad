"""The ``kaiju-tasks`` argument parser: every command, its options and their help."""

from __future__ import annotations

import argparse
from pathlib import Path

from kaiju_tasks import models


def build() -> argparse.ArgumentParser:
    """The parser of the whole command line."""
    parser = argparse.ArgumentParser(
        prog="kaiju-tasks", description="PostgreSQL-backed task manager for asyncio applications."
    )
    parser.add_argument("--config-path", type=Path, help="configuration file (highest file layer)")
    parser.add_argument("--dsn", help="PostgreSQL DSN (overrides [database] dsn)")
    parser.add_argument(
        "--log-level",
        help="DEBUG, INFO, WARNING, ERROR, CRITICAL (default [logging] level; WARNING for "
        "migrate, token, task, notifications, events, top and config)",
    )
    parser.add_argument("--log-format", choices=["text", "json"], help="log record format")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending database migrations")

    executor = commands.add_parser("executor", help="run an executor")
    executor.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="NAME[=URL]",
        help="serve this app; with =URL its stages are JSON-RPC calls to URL, with"
        " '=URL batch=N' in JSON-RPC batches of up to N calls (repeatable)",
    )
    executor.add_argument(
        "--methods",
        action="append",
        default=[],
        metavar="MODULE:ATTRIBUTE",
        help="import a kaiju_tasks.methods.Methods registry to run stages in-process",
    )
    executor.add_argument(
        "--concurrency",
        type=int,
        help="stage calls at once (batch requests to a batched app) ([executor])",
    )
    executor.add_argument("--prefetch", type=int, help="the most tasks claimed ahead of free slots")
    executor.add_argument("--id", help="executor id (default: host-pid-random)")
    executor.add_argument("--shutdown-grace", type=float, help="seconds to finish stages on stop")
    executor.add_argument("--heartbeat", type=float, help="seconds between liveness records")
    executor.add_argument(
        "--lease",
        type=float,
        help="seconds after its last recorded heartbeat the executor may still start stage"
        " calls (default: 3 heartbeats; the manager rescues its tasks no earlier)",
    )
    executor.add_argument("--poll", type=float, help="longest seconds between claims when idle")
    executor.add_argument(
        "--debug",
        action="store_true",
        help="serve private queues APP@debug-RANDOM only (printed at start), never the apps'"
        " own: route a task there with `task copy ID --app QUEUE`; their tasks fail when it stops",
    )

    manager = commands.add_parser("manager", help="run the manager (one leader per database)")
    manager.add_argument("--interval", type=float, help="seconds between ticks ([manager])")
    manager.add_argument(
        "--stale-after",
        type=float,
        help="seconds of executor silence before its tasks are rescued",
    )
    manager.add_argument("--disable-gc", action="store_true", help="no garbage collection")
    manager.add_argument("--disable-scheduler", action="store_true", help="only collect garbage")
    manager.add_argument(
        "--standby-interval",
        type=float,
        help="seconds between a standby's attempts to take the leadership",
    )

    server = commands.add_parser("server", help="run the HTTP JSON-RPC API")
    server.add_argument("--host", help="listen address (default [server] host, 127.0.0.1)")
    server.add_argument("--port", type=int, help="TCP port (default [server] port, 8080)")

    run = commands.add_parser(
        "run",
        help="everything in one process: migrations, manager, executor and HTTP API "
        "(embedded PostgreSQL when no database is configured)",
    )
    run.add_argument("--host", help="listen address (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="TCP port (default 8080)")
    run.add_argument(
        "--demo",
        action="store_true",
        help="register example methods and submit an example pipeline",
    )
    run.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="NAME[=URL]",
        help="apps the executor serves (default: default)",
    )
    run.add_argument(
        "--methods",
        action="append",
        default=[],
        metavar="MODULE:ATTRIBUTE",
        help="import a Methods registry to run stages in-process",
    )

    token = commands.add_parser("token", help="manage API tokens")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="create a token and print it (once)")
    create.add_argument("--user", required=True, help="the user id the token acts as")
    create.add_argument(
        "--permission",
        action="append",
        default=[],
        choices=[p.value for p in models.Permission],
        help="grant a permission (repeatable)",
    )
    create.add_argument("--system", action="store_true", help="grant everything")
    create.add_argument("--name", help="a note to recognise the token by")
    token_commands.add_parser("list", help="list tokens (never their secret)")
    revoke = token_commands.add_parser("revoke", help="revoke a token by id")
    revoke.add_argument("id", type=int)
    for sub in (create, token_commands.choices["list"], revoke):
        sub.add_argument("--json", action="store_true", help="print JSON")

    task = commands.add_parser("task", help="create, inspect and control tasks")
    task_commands = task.add_subparsers(dest="task_command", required=True)
    t_create = task_commands.add_parser("create", help="create a task from JSON")
    t_create.add_argument("data", help="the task as JSON (a list creates many), or - for stdin")
    t_get = task_commands.add_parser("get", help="show a task")
    t_get.add_argument("id")
    t_get.add_argument("--columns", help="comma-separated columns")
    t_list = task_commands.add_parser("list", help="list tasks, newest first")
    t_list.add_argument("--status", action="append", help="only these statuses (repeatable)")
    t_list.add_argument("--app", action="append", help="only these apps (repeatable)")
    t_list.add_argument("--conditions", help="filter as JSON (see the guide)")
    t_list.add_argument("--limit", type=int, default=20)
    t_list.add_argument("--offset", type=int, default=0)
    for name, text in (
        ("reset", "reset a task and queue it again"),
        ("cancel", "cancel a task that has not ended"),
    ):
        task_commands.add_parser(name, help=text).add_argument("id")
    t_copy = task_commands.add_parser(
        "copy", help="queue a copy of a task (new id, no cron or next_task), e.g. for a debug queue"
    )
    t_copy.add_argument("id")
    t_copy.add_argument("--app", help="the copy's app_name (default: the original's)")
    t_message = task_commands.add_parser("message", help="send a message to a waiting task")
    t_message.add_argument("id")
    t_message.add_argument("data", help="the message as JSON")

    notes = commands.add_parser("notifications", help="read notifications")
    notes_commands = notes.add_subparsers(dest="notifications_command", required=True)
    n_list = notes_commands.add_parser("list", help="list notifications, newest first")
    n_list.add_argument("--task", help="only those of this task")
    n_list.add_argument("--limit", type=int, default=20)

    events = commands.add_parser("events", help="print lifecycle events as they happen")
    events.add_argument("--verbose", action="store_true", help="print each event's details")
    events.add_argument("--app", help="only events of this app's tasks")
    events.add_argument("--task", help="only events of this task")
    events.add_argument(
        "--from-start",
        action="store_true",
        help="replay the kept events first instead of starting from now",
    )
    events.add_argument("--limit", type=int, help="stop after this many events")
    events.add_argument("--timeout", type=float, help="stop after this many seconds")

    top = commands.add_parser("top", help="a live table of executors and running tasks")
    top.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes")
    top.add_argument("--once", action="store_true", help="print one snapshot and exit")
    top.add_argument("--limit", type=int, default=30, help="most running or waiting tasks shown")

    config_command = commands.add_parser(
        "config", help="print the effective configuration and where each value came from"
    )
    for sub in (*task_commands.choices.values(), n_list, config_command):
        sub.add_argument("--json", action="store_true", help="print JSON")
    return parser
