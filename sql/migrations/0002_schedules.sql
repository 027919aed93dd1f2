-- Periodic duties shared by all workers: a duty runs when it claims its row,
-- which at most one worker can do per interval.
CREATE TABLE schedules (
    name         text PRIMARY KEY,
    last_run_at  timestamptz NOT NULL DEFAULT '-infinity',
    runs         bigint NOT NULL DEFAULT 0
);

INSERT INTO schedules (name) VALUES ('stall_sweep');
