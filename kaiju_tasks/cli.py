"""Composition root: settings, pool, store, clock; the ``kaiju-tasks`` command line."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from kaiju_tasks import config, errors
from kaiju_tasks.store import embedded, migrate

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def database(settings: config.Settings) -> Iterator[str]:
    """Yield the configured DSN, or start the embedded server for the duration."""
    if settings.database.dsn:
        yield settings.database.dsn
        return
    data_dir = Path(settings.database.embedded_dir) if settings.database.embedded_dir else None
    server = embedded.EmbeddedPostgres(data_dir)
    dsn = server.start()
    try:
        yield dsn
    finally:
        server.stop()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaiju-tasks", description="PostgreSQL-backed task manager for asyncio applications."
    )
    parser.add_argument("--config-path", type=Path, help="configuration file (highest file layer)")
    parser.add_argument("--dsn", help="PostgreSQL DSN (overrides [database] dsn)")
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR")
    parser.add_argument("--log-format", choices=["text", "json"], help="log record format")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("migrate", help="apply pending database migrations")
    return parser


def _configure_logging(settings: config.Settings) -> None:
    logging.basicConfig(
        level=settings.logging.level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    try:
        settings, _ = config.load(
            config_path=args.config_path,
            overrides={
                "database": {"dsn": args.dsn},
                "logging": {"level": args.log_level, "format": args.log_format},
            },
        )
        _configure_logging(settings)
        if args.command == "migrate":
            return _migrate(settings)
    except errors.KaijuTasksError as exc:
        print(f"kaiju-tasks: {exc}", file=sys.stderr)
        return 1
    return 2


def _migrate(settings: config.Settings) -> int:
    with database(settings) as dsn:
        applied: list[Any] = asyncio.run(migrate.migrate(dsn))
    print(json.dumps({"applied": applied}) if applied else "database is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
