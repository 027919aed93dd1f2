-- Lane owners' liveness: heartbeats, and ending a worker that went silent while it
-- owns lanes (docs/decisions.md, "A hung owner"). Worker ids are lowercase hex.

-- name: beat
INSERT INTO worker_heartbeats (worker_id) VALUES ($1)
ON CONFLICT (worker_id) DO UPDATE SET beat_at = now();

-- name: silent_workers
-- Workers whose last beat is older than $1 seconds, by the database's clock.
SELECT worker_id FROM worker_heartbeats
WHERE beat_at < now() - make_interval(secs => $1)
ORDER BY worker_id;

-- name: end_silent_worker
-- Forget worker $1 if it is still silent for $2 seconds, and terminate every backend
-- it tagged ('hub-worker:<role>@' || $1, then db.tagged's '@host:pid'), which releases
-- its advisory locks:
-- its lanes and its member slot. One statement: a worker that beat meanwhile is spared.
-- Only backends of our own role, which a role may always terminate (a superuser's may
-- not be). Returns the number of backends signalled.
WITH silent AS (
    DELETE FROM worker_heartbeats
    WHERE worker_id = $1 AND beat_at < now() - make_interval(secs => $2)
    RETURNING worker_id
)
SELECT count(*) FILTER (WHERE pg_terminate_backend(a.pid)) AS ended
FROM pg_stat_activity a
JOIN silent ON a.application_name LIKE 'hub-worker:%@' || silent.worker_id || '@%'
WHERE a.datname = current_database() AND a.usename = current_user
  AND a.pid <> pg_backend_pid();

-- name: forget_worker
-- A worker that stops cleanly removes its row.
DELETE FROM worker_heartbeats WHERE worker_id = $1;
