-- Bookkeeping of `hub-worker migrate`.

-- name: lock_migrations
-- Concurrent migrators wait here for each other instead of racing to create the same tables.
SELECT pg_advisory_lock($1::int, $2::int);

-- name: unlock_migrations
SELECT pg_advisory_unlock($1::int, $2::int);

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES ($1, $2);
