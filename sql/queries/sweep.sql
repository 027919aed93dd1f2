-- The stall sweep. "Stalled" is measured on the database's clock only: every
-- worker and the last_activity_at it compares with then share one clock, so
-- skew between worker machines cannot raise or hide a stall.

-- name: claim_schedule
-- Claim this interval's run of a periodic duty; no row back means it ran already.
UPDATE schedules
SET last_run_at = now(), runs = runs + 1
WHERE name = :name AND last_run_at <= now() - make_interval(secs => :interval_seconds)
RETURNING runs;

-- name: stalled_sessions
-- Sessions alive on paper, silent for longer than :stall_after_seconds, and not
-- yet reported stalled (a detection of :anomaly_type): :limit at most, so that
-- sessions beyond the first batch get their turn at the next sweep.
SELECT s.id FROM sessions AS s
WHERE s.status = 'active' AND s.archived_at IS NULL
  AND s.last_activity_at < now() - make_interval(secs => :stall_after_seconds)
  AND NOT EXISTS (
      SELECT 1 FROM detections AS d
      WHERE d.session_id = s.id AND d.anomaly_type = :anomaly_type AND d.resolved_at IS NULL)
ORDER BY s.id
LIMIT :limit;

-- name: open_stalls
-- Open a stall detection for each candidate still stalled, unless one is
-- active (repeated sweeps do not count). The session rows are locked, in id
-- order, so a heartbeat committing meanwhile is seen and its session skipped.
INSERT INTO detections (id, session_id, anomaly_type, severity, details, dedup_key)
SELECT candidate.detection_id, s.id, :anomaly_type, :severity,
       jsonb_build_object(
           'lastActivityAt', s.last_activity_at,
           'stalledSeconds', floor(extract(epoch FROM now() - s.last_activity_at))::bigint),
       candidate.dedup_key
FROM unnest(:session_id::text[], :dedup_key::text[], :detection_id::text[])
         AS candidate (session_id, dedup_key, detection_id)
JOIN sessions s ON s.id = candidate.session_id
WHERE s.status = 'active' AND s.archived_at IS NULL
  AND s.last_activity_at < now() - make_interval(secs => :stall_after_seconds)
ORDER BY s.id
FOR NO KEY UPDATE OF s
ON CONFLICT (dedup_key) WHERE resolved_at IS NULL DO NOTHING
RETURNING id, session_id, anomaly_type, severity, details, dedup_key, occurrence_count,
          created_at, updated_at, resolved_at, resolved_by, resolution;
