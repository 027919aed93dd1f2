-- Indexes that match the hot path's predicates, so that what a batch costs
-- depends on the batch, not on how many rows the hub holds (issue 13). Under
-- the generic plan asyncpg's prepared statements get, the planner cannot see
-- that `session_id = ANY($1)` names a few sessions; it must find an index whose
-- predicate and keys are exactly the query's.

-- active_detections_of_sessions, and the stall sweep's "no active stall yet":
-- the active detections of given sessions (of a type), never the resolved ones.
CREATE INDEX idx_detections_active_by_session ON detections (session_id, anomaly_type)
    WHERE resolved_at IS NULL;

-- newest_resolved_detections: per key, the detection resolved last, read from
-- the front of the index instead of a scan and a sort of the table.
CREATE INDEX idx_detections_resolved_by_key
    ON detections (dedup_key, resolved_at DESC, created_at DESC)
    WHERE resolved_at IS NOT NULL;

-- Replaced by the two above (and uq_detections_active_dedup_key): with them
-- gone, the generic plan of active_detections_of_sessions can no longer walk
-- every active detection of the hub in resolved_at order, and an insert
-- writes two indexes fewer.
DROP INDEX idx_detections_resolved_at;
DROP INDEX idx_detections_dedup_key;

-- Heartbeats and signals change only last_activity_at, metadata and updated_at
-- of a session. With last_activity_at indexed, each such update was non-HOT:
-- a new tuple in every index of sessions. The stall sweep now reads the live
-- sessions in id order (the order it wants) and compares last_activity_at in
-- the heap; the index changes only when a session ends or is archived.
DROP INDEX idx_sessions_stall_candidates;
CREATE INDEX idx_sessions_live ON sessions (id) WHERE status = 'active' AND archived_at IS NULL;

-- The UNIQUE constraint on mappings.session_id is an index on it already.
DROP INDEX idx_mappings_session_id;

-- Room on each page for the new versions of rows updated in place (HOT).
ALTER TABLE sessions SET (fillfactor = 80);
ALTER TABLE detections SET (fillfactor = 80);
