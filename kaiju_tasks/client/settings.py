"""The client's settings: their defaults, the environment variables and their validation.

``endpoint`` and ``token`` turn the ``url`` and ``token`` a client is given (or reads from
:data:`URL_ENV` and :data:`TOKEN_ENV`) into what it posts to and sends, or raise
:class:`~kaiju_tasks.errors.ConfigError` without quoting a secret.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from kaiju_tasks import errors, redact

URL_ENV: Final = "KAIJU_TASKS_URL"
"""Environment variable read for the server's URL when ``url`` is not given."""
TOKEN_ENV: Final = "KAIJU_TASKS_TOKEN"
"""Environment variable read for the bearer token when ``token`` is not given."""
DEFAULT_URL: Final = "http://127.0.0.1:8080"
"""Where ``kaiju-tasks server`` and ``run`` listen by default."""
RPC_PATH: Final = "/public/rpc"
"""The JSON-RPC endpoint, appended to the URL unless the URL already ends with it."""
DEFAULT_TIMEOUT: Final = 40.0
"""Seconds one call may take, retries included: more than the server's default
``request_timeout`` (30 s), so that the server's own timeout error arrives first."""
DEFAULT_RETRIES: Final = 3
"""How many times a call of :data:`RETRIED` is sent again after a connection failure."""
DEFAULT_BACKOFF: Final = 0.5
"""Seconds before the first retry; doubled for each next one (with jitter), at most
:data:`MAX_BACKOFF`."""
MAX_BACKOFF: Final = 4.0
"""Longest pause between two attempts (seconds)."""
KEEPALIVE: Final = 5.0
"""Seconds an idle connection is kept for the next call: under the server's ``header_timeout``
(10 s by default), after which the server closes idle connections itself."""
DEFAULT_LIMIT: Final = 100
"""The default page size of ``list`` (as in the services)."""

RETRIED: Final = frozenset(
    {"tasks.get", "tasks.exists", "tasks.list", "notifications.get", "notifications.list"}
)
"""The methods sent again after a connection failure: they change nothing, so a call that the
server ran before the connection broke can safely run twice. Every other method is sent once."""
RETRY_STATUSES: Final = frozenset({502, 503, 504})
"""HTTP statuses of a proxy in front of a server that is down, retried like connection failures
(when the body is not a JSON-RPC reply)."""

_TOKEN_CHARS: Final = re.compile(r"[!-~]+")  # visible ASCII: what a header value may carry


def endpoint(url: str, source: str) -> str:
    """The JSON-RPC endpoint of ``url``: the URL itself if it ends with ``/public/rpc``.

    ``source`` names where ``url`` came from, for the message of the ``ConfigError``.
    """
    shown = redact.url(url)
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise errors.ConfigError(f"{source}: {shown!r} is not a URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.ConfigError(
            f"{source} must be an http(s) URL such as {DEFAULT_URL}, got {shown!r}"
        )
    if parts.username is not None or parts.password is not None:
        raise errors.ConfigError(
            f"{source}: {shown!r} holds a user or password; give the token as token= or "
            f"{TOKEN_ENV} instead"
        )
    if parts.query or parts.fragment:
        raise errors.ConfigError(f"{source}: {shown!r} has a query or fragment; remove it")
    path = parts.path.rstrip("/")
    if not path.endswith(RPC_PATH):
        path += RPC_PATH
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def token(value: str | None, source: str) -> str | None:
    """The bearer token to send (stripped), or None when there is none."""
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    if _TOKEN_CHARS.fullmatch(value) is None:
        # Never quote the token: only say where it came from.
        raise errors.ConfigError(
            f"the token from {source} holds characters an HTTP header cannot carry"
        )
    return value
