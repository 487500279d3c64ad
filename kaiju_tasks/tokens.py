"""TokenService: the API tokens callers authenticate with (bearer tokens over HTTP).

A token maps to a user id and its permissions. Only the token's SHA-256 is stored, so the secret
is shown once, when the token is created.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from kaiju_tasks import clock as clock_
from kaiju_tasks import errors, models, wire
from kaiju_tasks.store import base

TOKEN_PREFIX = "kt_"
"""Every token starts with this, so a token is recognised (and refused) without a lookup."""


class TokenService:
    """API tokens: each maps to a user id and permissions; only a hash is stored."""

    def __init__(self, store: base.TaskStore, clock: clock_.Clock | None = None) -> None:
        self.store = store
        self.clock: clock_.Clock = clock or clock_.SystemClock()

    async def create(
        self, user_id: str, permissions: Sequence[str] = (), name: str | None = None
    ) -> dict[str, Any]:
        """Create a token; the returned ``token`` is shown only this once."""
        if not 1 <= len(str(user_id)) <= 256:
            raise errors.ValidationError("a user id is 1 to 256 characters", field="user_id")
        caller = models.Caller.user(user_id, permissions)  # validates the permission names
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        row = await self.store.insert_token(
            _token_hash(token),
            user_id=user_id,
            permissions=sorted(p.value for p in caller.permissions),
            name=name,
            now=self.clock.now(),
        )
        return {**wire.json_ready(row), "token": token}

    async def list(self) -> builtins.list[dict[str, Any]]:
        """Return every token (without the secret)."""
        return [wire.json_ready(row) for row in await self.store.list_tokens()]

    async def revoke(self, id: int) -> dict[str, Any]:
        """Revoke a token; it stops working at once."""
        row = await self.store.revoke_token(id, now=self.clock.now())
        if row is None:
            raise errors.KaijuTasksError(f"no active token {id}")
        return wire.json_ready(row)

    async def authenticate(self, token: str | None) -> models.Caller:
        """Return the caller a bearer token stands for; raise NotAuthorized."""
        if not token or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
            raise errors.NotAuthorized()
        row = await self.store.find_token(_token_hash(token))
        if row is None:
            raise errors.NotAuthorized()
        return models.Caller.user(row["user_id"], row["permissions"])


def _token_hash(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough: nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()
