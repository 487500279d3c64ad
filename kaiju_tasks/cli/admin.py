"""The short commands on records: ``token``, ``task``, ``notifications`` and ``config``.

``task`` and ``notifications`` act as the system caller: they see and change every user's tasks.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from kaiju_tasks import config, errors, models, wiring
from kaiju_tasks.clock import SystemClock
from kaiju_tasks.service import NotificationService, TaskService, TokenService


def token(settings: config.Settings, args: argparse.Namespace) -> int:
    """``token create``, ``token list`` and ``token revoke``."""

    async def act(dsn: str) -> Any:
        async with wiring.engine_store(settings, dsn, "kaiju-tasks-cli") as store:
            tokens = TokenService(store)
            if args.token_command == "create":
                permissions = ["system"] if args.system else args.permission
                return await tokens.create(args.user, permissions, args.name)
            if args.token_command == "revoke":
                return await tokens.revoke(args.id)
            return await tokens.list()

    with wiring.database(settings) as dsn:
        result = asyncio.run(act(dsn))
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.token_command == "create":
        print(result["token"])
    elif args.token_command == "revoke":
        print(f"token {result['id']} revoked")
    else:
        print(f"{'id':>5}  {'user':20}  {'permissions':30}  {'created':32}  revoked")
        for row in result:
            print(
                f"{row['id']:>5}  {row['user_id']:20}  {','.join(row['permissions']):30}  "
                f"{row['created']:32}  {row['revoked_at'] or ''}"
            )
    return 0


def _json_arg(text: str, what: str) -> Any:
    if text == "-":
        text = sys.stdin.read()
    try:
        return json.loads(text)
    except ValueError as exc:
        raise errors.ValidationError(f"{what} is not valid JSON: {exc}", field=what) from None


TASK_TABLE = ("id", "app_name", "status", "stage", "stages", "exit_code", "created")


def task(settings: config.Settings, args: argparse.Namespace) -> int:
    """``task ...`` and ``notifications list``, as the system caller."""

    async def act(dsn: str) -> Any:
        async with wiring.engine_store(settings, dsn, "kaiju-tasks-cli") as store:
            tasks = TaskService(store)
            if args.command == "notifications":
                conditions = {"task_id": args.task} if args.task else None
                return await NotificationService(store).list(
                    conditions=conditions, sort=[{"desc": "created"}], limit=args.limit
                )
            command = args.task_command
            if command == "create":
                created = await tasks.create(_json_arg(args.data, "data"))
                await _warn_unserved(store, created)
                return created
            if command == "get":
                columns = args.columns.split(",") if args.columns else None
                return await tasks.get(args.id, columns)
            if command == "list":
                conditions = _json_arg(args.conditions, "conditions") if args.conditions else {}
                if args.status:
                    conditions["status"] = args.status
                if args.app:
                    conditions["app_name"] = args.app
                return await tasks.list(
                    conditions=conditions,
                    sort=[{"desc": "created"}],
                    offset=args.offset,
                    limit=args.limit,
                    columns=list(TASK_TABLE),
                )
            if command == "message":
                return await tasks.write_message(args.id, _json_arg(args.data, "data"))
            if command == "copy":
                created = await tasks.copy(args.id, args.app)
                await _warn_unserved(store, created)
                return created
            return await getattr(tasks, command)(args.id)

    with wiring.database(settings) as dsn:
        result = asyncio.run(act(dsn))
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif isinstance(result, dict) and "data" in result and "on_page" in result:
        columns = (
            TASK_TABLE
            if args.command == "task"
            else ("id", "task_id", "status", "exit_code", "read", "created")
        )
        _print_table(result["data"], columns)
        print(f"{result['on_page']} of {result['count']}")
    elif isinstance(result, list):
        _print_table(result, ("id", "status", "job_id"))
    elif isinstance(result, dict):
        width = max(len(k) for k in result)
        for key, value in result.items():
            shown = value if isinstance(value, str) or value is None else json.dumps(value)
            print(f"{key:<{width}}  {shown}")
    return 0


async def _warn_unserved(store: Any, created: Any) -> None:
    """Warn on stderr about each created task's app that no live executor serves."""
    from kaiju_tasks.insights import ALIVE_WITHIN

    rows = created if isinstance(created, list) else [created]
    apps = sorted({r["app_name"] for r in rows if isinstance(r, dict) and r.get("app_name")})
    if not apps:
        return
    now = SystemClock().now()
    served = await store.served_apps(alive_since=now - ALIVE_WITHIN)
    for app in apps:
        if app not in served and models.DEBUG_MARK in app:
            print(
                f"kaiju-tasks: warning: no live debug executor serves queue {app!r}: the manager"
                " fails its tasks (reason debug_executor_gone); start `kaiju-tasks executor"
                " --debug` and use the queue it prints",
                file=sys.stderr,
            )
        elif app not in served:
            print(
                f"kaiju-tasks: warning: no live executor serves app {app!r}: its tasks stay "
                "queued until one does, and fail when their deadline passes; start one with "
                f"`kaiju-tasks executor --app {shlex.quote(app)}`",
                file=sys.stderr,
            )


def _print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> None:
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def show_config(
    settings: config.Settings, sources: dict[str, str], args: argparse.Namespace
) -> int:
    """Print every option with its value and where it came from; secrets masked."""
    import dataclasses as dc

    shown: dict[str, dict[str, Any]] = {}
    for section in ("database", "server", "executor", "manager", "logging"):
        values = dc.asdict(getattr(settings, section))
        for option, value in values.items():
            key = f"{section}.{option}"
            if (section, option) in config.SECRET_OPTIONS and value:
                value = config.mask(str(value))
            shown[key] = {"value": value, "source": sources.get(key, "default")}
    for app, url in settings.apps.items():
        size = settings.app_batch.get(app)
        shown[f"apps.{app}"] = {
            "value": config.mask(url) + (f" batch={size}" if size else ""),
            "source": sources.get(f"apps.{app}", "default"),
        }
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        width = max(len(k) for k in shown)
        for key, item in shown.items():
            print(f"{key:<{width}}  {item['value']!s:<40}  ({item['source']})")
    return 0
