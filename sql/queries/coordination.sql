-- Leadership and ownership through PostgreSQL advisory locks. Locks are
-- session-level: the server releases them when the holder's connection
-- dies, which is what hands a lane or the relay over to another worker.

-- name: try_lock
SELECT pg_try_advisory_lock($1::int, $2::int) AS locked;

-- name: unlock
SELECT pg_advisory_unlock($1::int, $2::int) AS unlocked;

-- name: held_locks
-- Advisory locks of one namespace held by anyone in this database, within [$2, $3).
SELECT objid::bigint AS objid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid::bigint = $1 AND objid::bigint >= $2 AND objid::bigint < $3;

-- name: purge_ledger
-- Forget eventIds the stream can no longer redeliver, a bounded batch at a time,
-- oldest first. The ORDER BY keeps it on idx_processed_events_processed_at: with
-- a bare LIMIT the planner hoped a sequential scan would find old rows early,
-- and read the whole ledger when there were none; = ANY (ARRAY(…)) deletes
-- through the primary key rather than joining against a scan of the ledger.
DELETE FROM processed_events
WHERE event_id = ANY (ARRAY(
    SELECT event_id FROM processed_events
    WHERE processed_at < now() - make_interval(secs => $1)
    ORDER BY processed_at
    LIMIT $2
));

-- name: writable
-- Readiness: a standby (or a database set to default_transaction_read_only) answers
-- but cannot take a single event.
SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off';

-- name: bound_session
-- Every worker connection: how long a statement or an open transaction may take,
-- and how soon the server notices a client that vanished. set_config, not SET, so
-- the values are parameters; a connection pooler passes them as ordinary queries.
SELECT set_config('statement_timeout', $1, false),
       set_config('idle_in_transaction_session_timeout', $1, false),
       set_config('tcp_keepalives_idle', $2, false),
       set_config('tcp_keepalives_interval', $3, false),
       set_config('tcp_keepalives_count', $4, false);
