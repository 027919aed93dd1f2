-- Lane owners say they are alive. Each worker's lane manager writes its row every
-- few seconds from its control connection; every connection of that manager (the
-- control one and one per owned lane) carries the worker id at the end of its
-- application_name (`hub-worker:<lane>@<worker_id>`). A peer that finds a row silent
-- for too long (a worker stopped with SIGSTOP keeps its connections and advisory
-- locks alive) terminates those backends, which releases the lanes, and deletes the
-- row. `beat_at` is the database's clock, so all workers judge by one clock.
CREATE TABLE worker_heartbeats (
    worker_id   text PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT now(),
    beat_at     timestamptz NOT NULL DEFAULT now()
);
