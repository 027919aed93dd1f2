-- The once-only ledger (processed_events) is written with each batch (batch.sql's
-- record_events); here its retention (worker/maintenance.py).

-- name: purge_ledger
-- Forget eventIds the stream can no longer redeliver (older than
-- :older_than_seconds), :batch rows at most at a time, oldest first. The ORDER BY
-- keeps it on idx_processed_events_processed_at: with a bare LIMIT the planner
-- hoped a sequential scan would find old rows early, and read the whole ledger
-- when there were none; = ANY (ARRAY(…)) deletes through the primary key rather
-- than joining against a scan of the ledger.
DELETE FROM processed_events
WHERE event_id = ANY (ARRAY(
    SELECT event_id FROM processed_events
    WHERE processed_at < now() - make_interval(secs => :older_than_seconds)
    ORDER BY processed_at
    LIMIT :batch
));
