-- kaiju-tasks 0003: API tokens. Only a SHA-256 of each token is kept; the token itself is shown
-- once, when it is created.

CREATE TABLE tokens (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    token_hash  text        NOT NULL UNIQUE,
    user_id     text        NOT NULL CHECK (length(user_id) BETWEEN 1 AND 256),
    permissions text[]      NOT NULL DEFAULT '{}',
    name        text,
    created     timestamptz NOT NULL,
    revoked_at  timestamptz
);
