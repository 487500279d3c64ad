"""Who calls the JSON-RPC server: bearer tokens, client addresses and failed-login budgets.

Each client address may fail authentication ``auth_failures`` times per ``auth_window``
(:class:`AuthLimiter`); the server and the dashboard authenticate through one
:class:`CountedTokens`, so one budget covers both. ``X-Forwarded-For`` is believed only from
trusted proxies (:func:`client_address`).
"""

from __future__ import annotations

import collections
import contextvars
import ipaddress
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from aiohttp import web

from kaiju_tasks import errors, models
from kaiju_tasks.service import TokenService

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuthLimiter:
    """Failed authentications per client address: a token bucket each, in a bounded table.

    Each address may fail ``failures`` times at once, and earns one more try every
    ``window / failures`` seconds. At most ``clients`` addresses are tracked; beyond, the one
    that failed least recently is forgotten. Addresses that never fail take no room.
    """

    def __init__(
        self,
        failures: int,
        window: float,
        clients: int,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.failures = failures
        self.rate = failures / window  # tries earned per second
        self.clients = clients
        self._now = now
        self._buckets: collections.OrderedDict[str, tuple[float, float]] = collections.OrderedDict()

    def _tokens(self, address: str) -> float:
        tokens, at = self._buckets.get(address, (float(self.failures), self._now()))
        return min(float(self.failures), tokens + (self._now() - at) * self.rate)

    def retry_after(self, address: str) -> float:
        """Seconds until ``address`` may try again (0: now)."""
        if address not in self._buckets:
            return 0.0
        tokens = self._tokens(address)
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate

    def failed(self, address: str) -> None:
        """Count one failed authentication of ``address``."""
        tokens = max(0.0, self._tokens(address) - 1)
        self._buckets[address] = (tokens, self._now())
        self._buckets.move_to_end(address)
        while len(self._buckets) > self.clients:
            self._buckets.popitem(last=False)

    def __len__(self) -> int:
        return len(self._buckets)


LIMITER_KEY = web.AppKey("auth_limiter", AuthLimiter)

CLIENT: contextvars.ContextVar[str] = contextvars.ContextVar("kaiju_tasks_client", default="")
"""The address of the request being served (set by the server's guard middleware)."""


class _Refusals(Protocol):
    """What :class:`CountedTokens` reads of the server's ``Api``."""

    @property
    def on_auth_refused(self) -> Callable[[str], None] | None: ...


class CountedTokens(TokenService):
    """A TokenService whose failed authentications count against the caller's address.

    The server and the dashboard authenticate through it, so one budget covers both.
    """

    def __init__(self, inner: TokenService, limiter: AuthLimiter, api: _Refusals) -> None:
        super().__init__(inner.store, inner.clock)
        self._limiter = limiter
        self._api = api

    async def authenticate(self, token: str | None) -> models.Caller:
        """Return the caller of ``token``; count a failure against the current address."""
        try:
            return await super().authenticate(token)
        except errors.NotAuthorized:
            self._limiter.failed(CLIENT.get())
            if self._api.on_auth_refused is not None:
                self._api.on_auth_refused("invalid")
            raise


TOKENS_KEY = web.AppKey("counted_tokens", CountedTokens)


def client_address(request: web.Request, trusted: Sequence[Network]) -> str:
    """The address the request comes from.

    ``X-Forwarded-For`` is read only when the peer is a trusted proxy: its addresses are walked
    from the right, skipping trusted proxies, and the first other one is the client.
    """
    peer = request.remote or ""
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(request.headers.getall("X-Forwarded-For", [])).split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _is_trusted(hop, trusted):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return hop[:64]  # not an address: whatever the proxy wrote, bounded
    return peer


def _is_trusted(address: str, trusted: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


async def caller(tokens: TokenService, token: str | None) -> models.Caller | errors.NotAuthorized:
    """The caller of ``token``, or the refusal to hand to each call (which then answers it)."""
    try:
        return await tokens.authenticate(token)
    except errors.NotAuthorized as exc:
        return exc
