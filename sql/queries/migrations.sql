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

-- name: migrations_table_exists
-- Lets a role without CREATE rights see that nothing is pending before it tries anything.
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: role_exists
SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1);

-- name: quote_ident
SELECT quote_ident($1);
