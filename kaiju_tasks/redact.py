"""Secrets out of messages: the one place that hides passwords and keys of URLs and DSNs (pure).

Every text that leaves the process for a person (a task's error, a log line, ``kaiju-tasks
config``, ``/health``, ``/metrics``) passes a URL or DSN through :func:`url` or a free text
through :func:`text` first:

- the password of ``scheme://user:password@host`` becomes ``***``;
- every value of the query string becomes ``***`` (``?api_key=***&page=***``): a query may carry
  a secret under any name, so none is shown;
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
# A key/value DSN setting whose value is secret, quoted or not.
_DSN_SECRET: Final = re.compile(
    r"\b(password|sslpassword|passfile)(\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE
)


def url(value: str) -> str:
    """``value`` with its password and query values masked (see the module docstring)."""
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:  # e.g. a port that is not a number: show no part of it
        return _masked_whole(value)
    if not parts.scheme or not parts.netloc:
        return _DSN_SECRET.sub(rf"\1\2{MASK}", value)
    netloc = parts.netloc
    if password is not None or ":" in netloc.rpartition("@")[0]:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:{MASK}@{host}"
    query = "&".join(
        f"{item.partition('=')[0]}={MASK}" if item else item for item in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query, fragment=""))


def text(value: str) -> str:
    """``value`` with every URL in it passed through :func:`url` and DSN secrets masked."""
    masked = _URL_IN_TEXT.sub(lambda found: url(found.group(0)), value)
    return _DSN_SECRET.sub(rf"\1\2{MASK}", masked)


def _masked_whole(value: str) -> str:
    scheme, sep, _ = value.partition("://")
    return f"{scheme}://{MASK}" if sep else MASK
