-- kaiju-tasks 0012: server-side dashboard sessions.
--
-- The dashboard's cookie holds a random session id; only its SHA-256 is kept here, with the API
-- token the session stands for. Logging out deletes the row, so a replayed cookie finds nothing;
-- a revoked token ends its sessions at once (every lookup joins the token and requires it to be
-- active); expired rows are pruned. Kept in the database so that sessions survive restarts and
-- work across several server processes on one database.
CREATE TABLE dashboard_sessions (
    id_hash  text        COLLATE "C" PRIMARY KEY,
    token_id bigint      NOT NULL REFERENCES tokens (id) ON DELETE CASCADE,
    created  timestamptz NOT NULL,
    expires  timestamptz NOT NULL
);

-- The sessions of one token, oldest first (to keep at most N per token).
CREATE INDEX dashboard_sessions_token_idx ON dashboard_sessions (token_id, created);
-- What has expired (pruned at each login).
CREATE INDEX dashboard_sessions_expires_idx ON dashboard_sessions (expires);
