"""Secrets out of messages: the one place that hides passwords and keys of URLs and DSNs (pure).

Every text that leaves the process for a person (a task's error, a log line, ``kaiju-tasks
config``, ``/health``, ``/metrics``) passes a URL or DSN through :func:`url` or a free text
through :func:`text` first:

- the password of ``scheme://user:password@host`` becomes ``***``, also when it holds ``/``,
  ``?``, ``#`` or ``@`` unencoded (everything up to the first ``@`` after ``user:`` is taken for
  the password, so ``http://host:8080/p?mail=a@b`` shows as ``http://host:***@b``: better too
  much hidden than a secret shown);
- a URL whose port is not a number (``http://user:pass`` cut short) shows as ``scheme://***``;
- every value of the query string becomes ``***`` (``?api_key=***&page=***``), and an item
  without ``=`` is ``***`` whole: a query may carry a secret under any name, so none is shown;
- a fragment is dropped;
- in a libpq key/value DSN (``host=db password=secret``) the values of ``password``,
  ``sslpassword`` and ``passfile`` become ``***``.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import urlsplit, urlunsplit

MASK: Final = "***"

# A URL inside free text: a scheme, '://', then anything up to whitespace or a quote, less a
# trailing punctuation mark ("cannot reach http://host/rpc: refused").
_URL_IN_TEXT: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]{0,30}://[^\s'\"<>`]*[^\s'\"<>`.,:;)\]]")
# The userinfo of a URL (after '://'), up to the first '@': a password that holds '/', '?', '#' or
# '@' without encoding them would otherwise be read as a port, path, query or fragment.
_RAW_USERINFO: Final = re.compile(r"([^/?#@:\[\]]*):[^@]*@")
# A key/value DSN setting whose value is secret, quoted or not.
_DSN_SECRET: Final = re.compile(
    r"\b(password|sslpassword|passfile)(\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE
)


def url(value: str) -> str:
    """``value`` with its password and query values masked (see the module docstring)."""
    scheme, sep, rest = value.partition("://")
    raw = _RAW_USERINFO.match(rest) if sep else None
    if raw is not None:  # user:password@, the password maybe holding '/', '?', '#' or '@'
        value = f"{scheme}://{raw.group(1)}:{MASK}@{rest[raw.end() :]}"
    try:
        parts = urlsplit(value)
        password = parts.password
        netloc = parts.netloc
        if "@" not in netloc and ":" in netloc and not netloc.endswith("]") and "," not in netloc:
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:  # a "port" that is not a number may be the start of a password
        return _masked_whole(value)
    if not parts.scheme or not netloc:
        return _DSN_SECRET.sub(rf"\1\2{MASK}", value)
    if password is not None or ":" in netloc.rpartition("@")[0]:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{host}"
    query = "&".join(
        (f"{item.partition('=')[0]}={MASK}" if "=" in item else MASK) if item else item
        for item in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


def text(value: str) -> str:
    """``value`` with every URL in it passed through :func:`url` and DSN secrets masked."""
    if "://" in value:
        value = _URL_IN_TEXT.sub(lambda found: url(found.group(0)), value)
    if "pass" in value.lower():  # each secret setting of a DSN starts with or holds "pass"
        value = _DSN_SECRET.sub(rf"\1\2{MASK}", value)
    return value


def _masked_whole(value: str) -> str:
    scheme, sep, _ = value.partition("://")
    return f"{scheme}://{MASK}" if sep else MASK


def connect_failure(exc: BaseException) -> str:
    """Say why connecting to the database failed, with no part of its DSN's secrets.

    A DSN the driver cannot parse is described by the kind of error only: the driver quotes the
    piece it could not read, which may be part of the password.
    """
    from_server = type(exc).__module__.startswith("asyncpg.exceptions") and not isinstance(
        exc, ValueError | TypeError
    )
    if isinstance(exc, OSError) or from_server:
        # Some errors have no text (a connection closed during the handshake): name the kind.
        return f"cannot connect to the database: {text(str(exc)) or type(exc).__name__}"
    return (
        f"cannot connect to the database: its DSN cannot be parsed ({type(exc).__name__}); "
        "percent-encode special characters of the password (/ ? # @ :)"
    )
