-- Dead letters: bad input stored by the handler, listed and counted for operators,
-- and replayed by `hub-worker deadletters replay` (worker/cli/deadletters.py).

-- name: insert_dead_letter
-- A redelivered message that was already dead-lettered returns nothing.
INSERT INTO dead_letters (subject, headers, payload, reason, error, deliveries, stream_position,
                          subject_bytes, headers_bytes)
VALUES (:subject, :headers, :payload, :reason, :error, :deliveries, :stream_position,
        :subject_bytes, :headers_bytes)
ON CONFLICT (stream_position) DO NOTHING
RETURNING id, created_at;

-- name: list_dead_letters
-- Newest first, of one reason (or all when :reason is null).
SELECT id, created_at, subject, headers, payload, reason, error, deliveries,
       replayed_at, replay_count
FROM dead_letters
WHERE (:reason::text IS NULL OR reason = :reason::text)
ORDER BY id DESC
LIMIT :limit;

-- name: dead_letters_by_id
SELECT id, created_at, subject, headers, payload, reason, error, deliveries,
       replayed_at, replay_count
FROM dead_letters
WHERE id = ANY(:ids::bigint[])
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
WHERE id = :dead_letter_id
RETURNING replay_count;

-- name: mark_dead_letter_replayed
-- Called once JetStream acknowledged replay number :replay of the letter.
UPDATE dead_letters
SET replayed_at = now()
WHERE id = :dead_letter_id AND replay_count = :replay
RETURNING replayed_at, replay_count;

-- name: dead_letters_by_reason
-- `hub-worker status`: dead letters stored in the last :within_seconds, per reason,
-- most frequent first.
SELECT reason, count(*) AS letters
FROM dead_letters
WHERE created_at > now() - make_interval(secs => :within_seconds)
GROUP BY reason
ORDER BY letters DESC, reason;
