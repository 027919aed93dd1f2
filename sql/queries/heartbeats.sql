-- Lane owners' liveness: heartbeats, and ending a worker that went silent while it
-- owns lanes (docs/decisions.md, "A hung owner"). Worker ids are lowercase hex.

-- name: beat
INSERT INTO worker_heartbeats (worker_id) VALUES (:worker_id)
ON CONFLICT (worker_id) DO UPDATE SET beat_at = now();

-- name: silent_workers
-- Workers whose last beat is older than :silent_seconds, by the database's clock.
SELECT worker_id FROM worker_heartbeats
WHERE beat_at < now() - make_interval(secs => :silent_seconds)
ORDER BY worker_id;

-- name: end_silent_worker
-- Forget the worker if it is still silent for :silent_seconds, and terminate every
-- backend it tagged ('hub-worker:<role>@' || :worker_id, then db.tagged's
-- '@host:pid'), which releases its advisory locks:
-- its lanes, its member slot and any leadership. One statement: a worker that beat meanwhile is spared.
-- Only backends of our own role, which a role may always terminate (a superuser's may
-- not be). Returns the number of backends signalled.
WITH silent AS (
    DELETE FROM worker_heartbeats
    WHERE worker_id = :worker_id AND beat_at < now() - make_interval(secs => :silent_seconds)
    RETURNING worker_id
)
SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid)) AS ended
FROM pg_stat_activity a
JOIN silent ON a.application_name LIKE 'hub-worker:%@' || silent.worker_id || '@%'
WHERE a.datname = current_database() AND a.usename = current_user
  AND a.pid <> pg_backend_pid();

-- name: forget_worker
-- A worker that stops cleanly removes its row.
DELETE FROM worker_heartbeats WHERE worker_id = :worker_id;
