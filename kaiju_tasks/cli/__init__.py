"""The ``kaiju-tasks`` command line: settings, logging, and one handler per command.

:func:`main` loads the layered settings and dispatches; the components come from
:mod:`kaiju_tasks.wiring`. The commands live in submodules by kind:

- :mod:`~kaiju_tasks.cli.parser`: the arguments of every command;
- :mod:`~kaiju_tasks.cli.process`: ``migrate``, ``executor``, ``manager``, ``server``, ``run``;
- :mod:`~kaiju_tasks.cli.admin`: ``token``, ``task``, ``notifications``, ``config``;
- :mod:`~kaiju_tasks.cli.watch`: ``events``, ``top``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

from kaiju_tasks import config, errors, limits, logs, methods, redact, wiring
from kaiju_tasks.cli import admin, parser, process, watch

# Names other code and tests import from here.
_parser = parser.build
database = wiring.database
engine_store = wiring.engine_store
auth_counter = wiring.auth_counter
HEALTH_UNSERVED = wiring.HEALTH_UNSERVED
run_token = process.run_token
run_token_path = process.run_token_path
RUN_TOKEN_NAME = process.RUN_TOKEN_NAME
RUN_TOKEN_DIR = process.RUN_TOKEN_DIR
TASK_TABLE = admin.TASK_TABLE
TOP_UNSERVED = watch.TOP_UNSERVED


def _api(
    store: Any, registry: methods.Methods, settings: config.Settings, metrics: Any = None
) -> Any:
    """The JSON-RPC API of ``settings.server`` (see :func:`kaiju_tasks.wiring.api`)."""
    return wiring.api(store, registry, settings.server, metrics)


QUIET_COMMANDS = frozenset({"migrate", "token", "task", "notifications", "events", "top", "config"})
"""Short commands: they log at :data:`QUIET_LEVEL` unless ``--log-level`` is given."""
QUIET_LEVEL = "WARNING"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = parser.build().parse_args(argv)
    try:
        settings, sources = config.load(
            config_path=args.config_path,
            overrides={
                "database": {"dsn": args.dsn},
                "logging": {"level": args.log_level, "format": args.log_format},
            },
        )
        level = settings.logging.level
        if args.log_level is None and args.command in QUIET_COMMANDS:
            level = QUIET_LEVEL  # short commands speak only of trouble, as git and psql do
        logs.configure(level, settings.logging.format)
        limits.configure(settings.limits)
        if args.command == "migrate":
            return process.migrate(settings)
        if args.command == "executor":
            return process.executor(settings, args, sources)
        if args.command == "manager":
            return process.manager(settings, args)
        if args.command == "server":
            return process.server(settings, args)
        if args.command == "token":
            return admin.token(settings, args)
        if args.command == "run":
            return process.run(settings, args, sources)
        if args.command in ("task", "notifications"):
            return admin.task(settings, args)
        if args.command == "top":
            return watch.top(settings, args)
        if args.command == "events":
            return watch.events(settings, args)
        if args.command == "config":
            return admin.show_config(settings, sources, args)
    except errors.KaijuTasksError as exc:
        print(f"kaiju-tasks: {redact.text(str(exc))}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `kaiju-tasks task list | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return 2
