-- The transactional outbox and the dead letters it announces.

-- name: enqueue_outbox
-- Outbound events written in the caller's transaction, in the order given.
INSERT INTO outbox (event_id, subject, payload, aggregate)
SELECT event_id, subject, payload, aggregate
FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::text[]) WITH ORDINALITY
     AS pending (event_id, subject, payload, aggregate, position)
ORDER BY position;

-- name: pending_outbox
SELECT id, event_id, subject, payload, aggregate FROM outbox ORDER BY id LIMIT $1;

-- name: delete_outbox
DELETE FROM outbox WHERE id = ANY($1::bigint[]);

-- name: outbox_backlog
SELECT count(*) AS rows, min(created_at) AS oldest FROM outbox;

-- name: insert_dead_letter
-- A redelivered message that was already dead-lettered returns nothing.
INSERT INTO dead_letters (subject, headers, payload, reason, error, deliveries, stream_position,
                          subject_bytes, headers_bytes)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
ON CONFLICT (stream_position) DO NOTHING
RETURNING id, created_at;

-- name: relax_durability
-- For the relay's own connection: its commits only delete published rows.
SET synchronous_commit = off;
