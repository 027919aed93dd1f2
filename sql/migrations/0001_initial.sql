-- The coordination tables (contract section 8) and the worker's own
-- bookkeeping: the once-only ledger and the transactional outbox.
-- Enum-like columns are text with CHECK constraints so a new value is one
-- migration, not a type change.

CREATE TABLE accounts (
    id          text PRIMARY KEY,
    name        text,
    metadata    jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE spokes (
    id          text PRIMARY KEY,
    metadata    jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workspaces (
    id          text PRIMARY KEY,
    metadata    jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE tasks (
    id          text PRIMARY KEY,
    metadata    jsonb,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- spoke_id is nullable only for coordinator sessions known solely as a
-- mapping's parent_session_id: the first event that reports such a session
-- claims it for its spoke.
CREATE TABLE sessions (
    id                text PRIMARY KEY,
    spoke_id          text REFERENCES spokes (id),
    status            text NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'completed', 'failed', 'aborted')),
    last_activity_at  timestamptz,
    ended_at          timestamptz,
    archived_at       timestamptz,
    metadata          jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_sessions_spoke_id ON sessions (spoke_id);
-- The stall sweep scans exactly these rows.
CREATE INDEX idx_sessions_stall_candidates ON sessions (last_activity_at)
    WHERE status = 'active' AND archived_at IS NULL;

CREATE TABLE mappings (
    id                 text PRIMARY KEY,
    session_id         text NOT NULL UNIQUE REFERENCES sessions (id),
    spoke_id           text REFERENCES spokes (id),
    workspace_id       text REFERENCES workspaces (id),
    parent_session_id  text REFERENCES sessions (id) ON DELETE SET NULL,
    task_id            text REFERENCES tasks (id),
    task               text,
    status             text NOT NULL DEFAULT 'active'
                       CHECK (status IN ('active', 'completed', 'failed', 'aborted')),
    metadata           jsonb,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_mappings_session_id ON mappings (session_id);
CREATE INDEX idx_mappings_parent_session_id ON mappings (parent_session_id);
CREATE INDEX idx_mappings_spoke_id ON mappings (spoke_id);
CREATE INDEX idx_mappings_task_id ON mappings (task_id);
CREATE INDEX idx_mappings_workspace_id ON mappings (workspace_id);

CREATE TABLE detections (
    id                text PRIMARY KEY,
    session_id        text NOT NULL REFERENCES sessions (id),
    anomaly_type      text NOT NULL,
    severity          text NOT NULL CHECK (severity IN ('high', 'medium', 'low')),
    details           jsonb,
    resolved_at       timestamptz,
    resolved_by       text REFERENCES accounts (id) ON DELETE SET NULL,
    resolution        text CHECK (resolution IN
                      ('acknowledged', 'dismissed', 'escalated', 'fixed', 'auto_resolved')),
    dedup_key         text NOT NULL,
    occurrence_count  integer NOT NULL DEFAULT 1,
    metadata          jsonb,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_detections_session_id ON detections (session_id);
CREATE INDEX idx_detections_type ON detections (anomaly_type);
CREATE INDEX idx_detections_resolved_at ON detections (resolved_at);
CREATE INDEX idx_detections_dedup_key ON detections (dedup_key);
-- The dedup guarantee itself: at most one active detection per key, enforced
-- by the database so that no interleaving of workers can open two.
CREATE UNIQUE INDEX uq_detections_active_dedup_key ON detections (dedup_key)
    WHERE resolved_at IS NULL;

CREATE TABLE dead_letters (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at       timestamptz NOT NULL DEFAULT now(),
    subject          text NOT NULL,
    headers          jsonb,
    payload          bytea NOT NULL,
    reason           text NOT NULL CHECK (reason IN
                     ('invalid_json', 'too_large', 'invalid_event', 'unknown_subject',
                      'subject_mismatch', 'spoke_mismatch', 'handler_error')),
    error            text NOT NULL,
    deliveries       integer NOT NULL,
    -- "<stream>:<sequence>:<stored-at ns>" of the message in PU_EVENTS: a
    -- redelivery after a crash between commit and term finds its letter
    -- already written instead of writing a second one.
    stream_position  text UNIQUE
);
CREATE INDEX idx_dead_letters_created_at ON dead_letters (created_at);

-- Once-only ledger: an eventId is recorded in the same transaction as its
-- effects. Rows older than the stream's max age are deleted in the background.
CREATE TABLE processed_events (
    event_id      uuid PRIMARY KEY,
    processed_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_processed_events_processed_at ON processed_events (processed_at);

-- Transactional outbox: written with the change, published by the relay
-- after commit, deleted once JetStream acknowledged it. The identity gives
-- the publish order.
CREATE TABLE outbox (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    uuid NOT NULL,
    subject     text NOT NULL,
    payload     bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- Wake the relay at commit (notifications are delivered only when the
-- inserting transaction commits, and duplicates within it are folded).
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hub_worker_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
