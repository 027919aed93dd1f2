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

-- name: writable
-- Readiness: a standby (or a database set to default_transaction_read_only) answers
-- but cannot take a single event.
SELECT NOT pg_is_in_recovery() AND current_setting('transaction_read_only') = 'off';
