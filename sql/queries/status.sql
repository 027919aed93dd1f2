-- `hub-worker status` (worker/cli/status.py): who holds which lock, what is waiting,
-- what went wrong lately. Read-only; the runtime role may run every query here.

-- name: lock_holders
-- Advisory locks of one namespace ($1) held in this database, with the session
-- holding each: its key says the role (leader, lane, member slot), its
-- application_name which worker process holds it (worker.db.connect tags it).
SELECT l.objid::bigint AS key, l.pid, a.application_name, host(a.client_addr) AS client_addr,
       a.backend_start
FROM pg_locks AS l
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = $1
ORDER BY key;

-- name: dead_letters_by_reason
-- Dead letters stored in the last $1 seconds, per reason, most frequent first.
SELECT reason, count(*) AS letters
FROM dead_letters
WHERE created_at > now() - make_interval(secs => $1)
GROUP BY reason
ORDER BY letters DESC, reason;

-- name: active_detections_by_severity
SELECT severity, count(*) AS detections
FROM detections
WHERE resolved_at IS NULL
GROUP BY severity;
