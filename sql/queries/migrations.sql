-- Bookkeeping of `hub-worker migrate` (worker/schema.py): its lock, the table of
-- applied migrations, and what granting the runtime role needs.

-- name: lock_migrations
-- Concurrent migrators wait here for each other instead of racing to create the same tables.
SELECT pg_advisory_lock(:namespace::int, :key::int);

-- name: unlock_migrations
SELECT pg_advisory_unlock(:namespace::int, :key::int);

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

-- name: applied_migrations
SELECT version FROM schema_migrations;

-- name: record_migration
INSERT INTO schema_migrations (version, name) VALUES (:version, :name);

-- name: migrations_table_exists
-- Lets a role without CREATE rights see that nothing is pending before it tries anything.
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: role_exists
SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :role);

-- name: quote_ident
SELECT quote_ident(:identifier);
