"""Loads ``queries.sql`` into ``dict[str, LiteralString]``: every fixed runtime query, by name."""

from __future__ import annotations

import re
from importlib import resources
from typing import LiteralString

_HEADER = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def _load() -> dict[str, LiteralString]:
    text = resources.files("kaiju_tasks.store").joinpath("queries.sql").read_text("utf-8")
    parts = _HEADER.split(text)
    found: dict[str, LiteralString] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.startswith("--")]
        found[name] = "\n".join(lines).strip().rstrip(";")  # mypy: LiteralString is str
    return found


QUERIES = _load()
"""Query text by name, e.g. ``QUERIES["get_task"]``."""
