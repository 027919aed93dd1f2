-- Detections as operators see and change them: the resolve command, `hub-worker
-- detections` and `hub-worker status`. The hot path's reads and writes of detections
-- are in batch.sql, the stall sweep's in sweep.sql.

-- name: lock_detection
SELECT id, resolved_at FROM detections WHERE id = :detection_id FOR NO KEY UPDATE;

-- name: resolve_detection
UPDATE detections
SET resolved_at = now(), resolved_by = :resolved_by, resolution = :resolution,
    updated_at = now()
WHERE id = :detection_id AND resolved_at IS NULL
RETURNING id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
          created_at, updated_at, resolved_at, resolved_by, resolution;

-- name: list_detections
-- Active detections (highest severity first, most recently changed first), or
-- with :include_resolved the most recently changed ones whatever their state;
-- of one session when :session_id is not null.
SELECT id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
       created_at, updated_at, resolved_at, resolved_by, resolution
FROM detections
WHERE (:include_resolved::boolean OR resolved_at IS NULL)
  AND (:session_id::text IS NULL OR session_id = :session_id::text)
ORDER BY CASE WHEN :include_resolved::boolean THEN 0
              ELSE array_position(ARRAY['high', 'medium', 'low'], severity) END,
         updated_at DESC, id
LIMIT :limit;

-- name: active_detections_by_severity
SELECT severity, count(*) AS detections
FROM detections
WHERE resolved_at IS NULL
GROUP BY severity;
