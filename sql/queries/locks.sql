-- Leadership and ownership through PostgreSQL advisory locks (two-int form: the
-- hub's namespace and a key, worker/locks.py). Locks are session-level: the server
-- releases them when the holder's connection dies, which is what hands a lane or
-- the relay over to another worker.

-- name: try_lock
SELECT pg_try_advisory_lock(:namespace::int, :key::int) AS locked;

-- name: unlock
SELECT pg_advisory_unlock(:namespace::int, :key::int) AS unlocked;

-- name: held_locks
-- Advisory locks of one namespace held by anyone in this database, within
-- [:start, :stop).
SELECT objid::bigint AS objid FROM pg_locks
WHERE locktype = 'advisory' AND granted AND objsubid = 2
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid::bigint = :namespace AND objid::bigint >= :start AND objid::bigint < :stop;

-- name: lock_holders
-- `hub-worker status`: advisory locks of one namespace held in this database, with
-- the session holding each: its key says the role (leader, lane, member slot), its
-- application_name which worker process holds it (worker.db.connect tags it).
SELECT l.objid::bigint AS key, l.pid, a.application_name, host(a.client_addr) AS client_addr,
       a.backend_start
FROM pg_locks AS l
LEFT JOIN pg_stat_activity AS a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = :namespace
ORDER BY key;
