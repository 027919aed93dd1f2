-- The transactional outbox: outbound events written with the change, published by
-- the relay after commit, deleted once JetStream acknowledged them.

-- name: enqueue_outbox
-- Outbound events written in the caller's transaction, in the order given; the
-- relay leader is notified at commit (the writer's job since migration 0009).
WITH outbound AS (
    INSERT INTO outbox (event_id, subject, payload, aggregate)
    SELECT event_id, subject, payload, aggregate
    FROM unnest(:event_id::uuid[], :subject::text[], :payload::bytea[], :aggregate::text[])
         WITH ORDINALITY AS pending (event_id, subject, payload, aggregate, position)
    ORDER BY position
), notified AS (
    SELECT pg_notify('hub_worker_outbox', '') WHERE cardinality(:event_id::uuid[]) > 0
)
SELECT count(*) AS notified FROM notified;

-- name: pending_outbox
SELECT id, event_id, subject, payload, aggregate FROM outbox ORDER BY id LIMIT :limit;

-- name: delete_outbox
DELETE FROM outbox WHERE id = ANY(:ids::bigint[]);

-- name: outbox_backlog
-- `head` is the next row the relay must publish: while it stays the same, the relay
-- is not moving; `oldest` is when it was written. Read from the front of the primary
-- key, never the whole table: a busy outbox is mostly dead rows until vacuum comes,
-- and a count(*) of it took 157 ms a call late in a 1,000,000-event drain. Up to
-- :counted rows are counted; beyond, `rows` is the span of ids from the head to the
-- newest row (an upper bound: ids of rows published out of order count).
WITH head AS (
    SELECT id, created_at FROM outbox ORDER BY id LIMIT 1
), counted AS (
    SELECT count(*) AS n FROM (SELECT 1 FROM outbox ORDER BY id LIMIT :counted::int) AS c
)
SELECT CASE WHEN counted.n < :counted::int THEN counted.n
            ELSE (SELECT max(id) FROM outbox) - head.id + 1 END AS rows,
       head.created_at AS oldest, head.id AS head
FROM counted LEFT JOIN head ON true;

-- name: set_aside_outbox
-- Rows JetStream refused for good move out of the outbox with the reason, in one
-- statement: a row is either still pending or set aside, never both nor neither.
WITH refused AS (
    SELECT * FROM unnest(:id::bigint[], :reason::text[], :error::text[]) AS r (id, reason, error)
), moved AS (
    DELETE FROM outbox o USING refused r WHERE o.id = r.id
    RETURNING o.id, o.event_id, o.subject, o.payload, o.aggregate, o.created_at
)
INSERT INTO outbox_set_aside (id, event_id, subject, payload, aggregate, created_at, reason, error)
SELECT m.id, m.event_id, m.subject, m.payload, m.aggregate, m.created_at, r.reason, r.error
FROM moved m JOIN refused r USING (id)
ON CONFLICT (id) DO NOTHING;

-- name: relax_durability
-- For the relay's own connection: its commits only delete published rows.
SET synchronous_commit = off;

-- `hub-worker outbox` (worker/cli/outbox.py): the rows set aside, and putting one
-- back once its cause is fixed.

-- name: list_set_aside
SELECT id, event_id, subject, payload, aggregate, created_at, reason, error, set_aside_at,
       republished_at
FROM outbox_set_aside ORDER BY id DESC LIMIT :limit;

-- name: lock_set_aside
-- One row to republish, locked: two operators republishing it at once take turns.
SELECT id, event_id, subject, payload, aggregate, created_at, reason, error, set_aside_at,
       republished_at
FROM outbox_set_aside WHERE id = :id FOR UPDATE;

-- name: detection_state
-- A detection as committed now, DetectionState's fields in its order. FOR SHARE: a
-- change to it waits until the republished event is in the outbox, so the change's
-- own events come after it.
SELECT id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
       created_at, updated_at, resolved_at, resolved_by, resolution
FROM detections WHERE id = :id FOR SHARE;

-- name: mapping_state
-- A session's mapping as committed now, MappingState's fields in its order (FOR SHARE:
-- as detection_state).
SELECT id, session_id, spoke_id, workspace_id, parent_session_id, task_id, task, status,
       created_at, updated_at
FROM mappings WHERE session_id = :session_id FOR SHARE;

-- name: republish_set_aside
-- Back into the outbox as it was written (the same eventId, so the same Nats-Msg-Id),
-- the relay notified; the set-aside row records when. The new outbox row's id, or
-- none when the row was republished already. Should JetStream refuse it again, the
-- relay sets it aside again under that id.
WITH marked AS (
    UPDATE outbox_set_aside SET republished_at = now()
    WHERE id = :id AND republished_at IS NULL
    RETURNING event_id, subject, payload, aggregate
), again AS (
    INSERT INTO outbox (event_id, subject, payload, aggregate)
    SELECT event_id, subject, payload, aggregate FROM marked
    RETURNING id
)
SELECT id, pg_notify('hub_worker_outbox', '') FROM again;

-- name: republished_outcome
-- What became of republished rows (their new outbox ids): still in the outbox, set
-- aside again (with the reason), or neither: published.
SELECT r.id,
       EXISTS (SELECT 1 FROM outbox WHERE outbox.id = r.id) AS pending,
       a.reason, a.error
FROM unnest(:id::bigint[]) AS r (id)
LEFT JOIN outbox_set_aside AS a ON a.id = r.id
ORDER BY r.id;
