-- Detections: the signal upsert, the resolutions, and the late-news rule.

-- name: active_detection
-- The active detection of a key, locked so its previous severity is the one we update.
SELECT id, severity FROM detections
WHERE dedup_key = $1 AND resolved_at IS NULL
FOR UPDATE;

-- name: newest_resolved_detection
SELECT id, resolved_at FROM detections
WHERE dedup_key = $1 AND resolved_at IS NOT NULL
ORDER BY resolved_at DESC, created_at DESC
LIMIT 1
FOR UPDATE;

-- name: upsert_signal
-- Insert an active detection or add an occurrence to the active one. The
-- partial unique index decides, so concurrent workers can never open two;
-- severity only rises (low < medium < high).
INSERT INTO detections (id, session_id, anomaly_type, severity, details, dedup_key)
VALUES ($1, $2, $3, $4, $5, $6)
ON CONFLICT (dedup_key) WHERE resolved_at IS NULL DO UPDATE SET
    occurrence_count = detections.occurrence_count + 1,
    severity = CASE
        WHEN array_position(ARRAY['low', 'medium', 'high'], EXCLUDED.severity)
           > array_position(ARRAY['low', 'medium', 'high'], detections.severity)
        THEN EXCLUDED.severity ELSE detections.severity END,
    details = EXCLUDED.details,
    updated_at = now()
RETURNING id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
          created_at, updated_at, resolved_at, resolved_by, resolution;

-- name: add_late_occurrence
-- Late news about a resolved problem counts, but reopens nothing.
UPDATE detections SET occurrence_count = occurrence_count + 1, updated_at = now()
WHERE id = $1
RETURNING id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
          created_at, updated_at, resolved_at, resolved_by, resolution;

-- name: auto_resolve_session_detections
-- Resolve a session's active detections, all of them or of one anomaly type.
UPDATE detections
SET resolved_at = now(), resolved_by = NULL, resolution = 'auto_resolved', updated_at = now()
WHERE session_id = $1 AND resolved_at IS NULL AND ($2::text IS NULL OR anomaly_type = $2)
RETURNING id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
          created_at, updated_at, resolved_at, resolved_by, resolution;
