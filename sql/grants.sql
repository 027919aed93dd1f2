-- The rights `hub-worker run` needs, and no more: row reads and writes on the
-- tables it uses. No CREATE, ALTER, DROP or TRUNCATE, no DELETE of
-- coordination rows, no writes to accounts or schema_migrations.
--
-- The owner role that runs `hub-worker migrate` applies this after every
-- migration when HUB_DATABASE_RUNTIME_ROLE names the runtime role; by hand:
--
--     psql "$OWNER_DSN" -v runtime_role=hub_runtime -f sql/grants.sql
--
-- The runtime role must exist already (CREATE ROLE … LOGIN PASSWORD …, by a
-- role that may create roles). Re-running is harmless. Each line says which
-- part of the worker needs it.

GRANT USAGE ON SCHEMA public TO :"runtime_role";

-- Whether migrations are pending: `run` waits for the owner instead of applying them.
GRANT SELECT ON schema_migrations TO :"runtime_role";

-- Inbound events (sql/queries/batch.sql): rows are read and locked (FOR UPDATE
-- needs UPDATE), created, and advanced.
GRANT SELECT, INSERT, UPDATE ON sessions, mappings, detections TO :"runtime_role";
-- Reference rows are created on first sight, never changed (ON CONFLICT (id)
-- reads the key it conflicts on, hence SELECT).
GRANT SELECT, INSERT ON spokes, workspaces, tasks TO :"runtime_role";

-- The once-only ledger: written with each event, purged after the stream's max age.
GRANT SELECT, INSERT, DELETE ON processed_events TO :"runtime_role";

-- The transactional outbox: written with each change, deleted once published.
GRANT SELECT, INSERT, DELETE ON outbox TO :"runtime_role";
-- Outbox rows JetStream refused for good are moved aside with the reason, and kept.
GRANT SELECT, INSERT ON outbox_set_aside TO :"runtime_role";
-- `hub-worker outbox republish` (run beside the worker, as this role) puts one back
-- into the outbox and records when: that column only (FOR UPDATE needs it too).
GRANT UPDATE (republished_at) ON outbox_set_aside TO :"runtime_role";

-- Bad input is stored (and its id returned for the announcement).
GRANT SELECT, INSERT ON dead_letters TO :"runtime_role";
-- `hub-worker deadletters replay` (run beside the worker, as this role) records each
-- replay before publishing it and confirms it after: those two columns only.
GRANT UPDATE (replayed_at, replay_count) ON dead_letters TO :"runtime_role";

-- The resolve command checks that `resolvedBy` is a known account; accounts
-- are managed with `hub-worker accounts` under the owner role.
GRANT SELECT ON accounts TO :"runtime_role";

-- The stall sweep claims its interval in its schedules row.
GRANT SELECT, UPDATE ON schedules TO :"runtime_role";

-- Lane owners' heartbeats: each worker writes its own row, a peer deletes a row gone
-- silent (after terminating that worker's lane connections, which the same role may
-- do without any grant: pg_terminate_backend allows a role's own backends).
GRANT SELECT, INSERT, UPDATE, DELETE ON worker_heartbeats TO :"runtime_role";
