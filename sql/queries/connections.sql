-- A worker's connections: the limits each one gets, and whether the database it
-- reached can take writes.

-- name: bound_session
-- Every worker connection: how long a statement or an open transaction may take,
-- and how soon the server notices a client that vanished. set_config, not SET, so
-- the values are parameters; a connection pooler passes them as ordinary queries.
SELECT set_config('statement_timeout', :statement_timeout, false),
       set_config('idle_in_transaction_session_timeout', :statement_timeout, false),
       set_config('tcp_keepalives_idle', :keepalives_idle, false),
       set_config('tcp_keepalives_interval', :keepalives_interval, false),
       set_config('tcp_keepalives_count', :keepalives_count, false);

-- name: plan_by_keys
-- The lanes' and the leaders' connections (the relay, the stall sweep, the
-- maintenance): every statement they run reaches its rows by key, through an index. A connection
-- keeps its prepared statements, and their generic plans, until something
-- invalidates them, such as an ANALYZE; autovacuum runs one only once a table has
-- grown by a tenth, at most every autovacuum_naptime. On tables still small a
-- sequential scan is the cheapest plan, and it stays the plan while they fill
-- (the first minutes of a hub, an outbox filling during a NATS outage): a scan
-- of every detection per batch. Switched off, sequential scans are planned only
-- where no index applies (docs/decisions.md, "Plans by key").
SELECT set_config('enable_seqscan', 'off', false);

-- name: writable
-- Readiness: a standby (or a database set to default_transaction_read_only) answers
-- but cannot take a single event.
SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off';
