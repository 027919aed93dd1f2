-- Operator commands (worker/cli/): listing detections and dead letters,
-- and recording dead-letter replays.

-- name: list_detections
-- Active detections (highest severity first, most recently changed first), or
-- with $1 = true the most recently changed ones whatever their state;
-- $2 limits to one session when not null, $3 is the row limit.
SELECT id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
       created_at, updated_at, resolved_at, resolved_by, resolution
FROM detections
WHERE ($1::boolean OR resolved_at IS NULL)
  AND ($2::text IS NULL OR session_id = $2::text)
ORDER BY CASE WHEN $1::boolean THEN 0
              ELSE array_position(ARRAY['high', 'medium', 'low'], severity) END,
         updated_at DESC, id
LIMIT $3;

-- name: list_dead_letters
-- Newest first; $1 limits to one reason when not null, $2 is the row limit.
SELECT id, created_at, subject, headers, payload, reason, error, deliveries,
       replayed_at, replay_count
FROM dead_letters
WHERE ($1::text IS NULL OR reason = $1::text)
ORDER BY id DESC
LIMIT $2;

-- name: dead_letters_by_id
SELECT id, created_at, subject, headers, payload, reason, error, deliveries,
       replayed_at, replay_count
FROM dead_letters
WHERE id = ANY($1::bigint[])
ORDER BY id;

-- name: begin_dead_letter_replay
-- Recorded before publishing: the replay's number, which names its Nats-Msg-Id. A
-- replay begun and never confirmed (replayed_at NULL, replay_count > 0: the publish
-- or its confirmation failed) is retried under the same number, so the stream's
-- duplicate window drops it if the earlier attempt did land. The row lock
-- serialises two operators replaying one letter at once.
UPDATE dead_letters
SET replay_count = CASE
        WHEN replayed_at IS NULL AND replay_count > 0 THEN replay_count
        ELSE replay_count + 1
    END,
    replayed_at = NULL
WHERE id = $1
RETURNING replay_count;

-- name: mark_dead_letter_replayed
-- Called once JetStream acknowledged replay number $2 of the letter.
UPDATE dead_letters
SET replayed_at = now()
WHERE id = $1 AND replay_count = $2
RETURNING replayed_at, replay_count;
