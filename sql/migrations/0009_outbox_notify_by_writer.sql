-- The outbox's writers notify the relay themselves (sql/queries: write_batch and
-- enqueue_outbox, only when they insert rows), instead of a statement trigger.
-- A statement trigger fires for every INSERT, also one of no rows; write_batch
-- writes the outbox in the same statement as everything else a batch decides,
-- so a batch of heartbeats alone (no outbound event) would NOTIFY, and a
-- notifying transaction takes the database's notify lock at commit, which
-- serialises the commits of every lane (issue 13).
DROP TRIGGER outbox_notify ON outbox;
DROP FUNCTION outbox_notify();
