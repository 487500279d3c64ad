-- kaiju-tasks 0005: the transaction of each event, so that receivers can read events without
-- missing any: an id is taken at insert, not at commit, so ids alone can be seen out of order.
-- A receiver reads (xid, id) ranges whose transactions have all ended (below the snapshot xmin).
ALTER TABLE events ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX events_xid_idx ON events (xid, id);
