-- `hub-worker outbox republish` puts a set-aside outbound event back into the outbox
-- once its cause is fixed, and records when here: a row is republished once (a
-- republished event JetStream refuses again is set aside again, as a new row).
ALTER TABLE outbox_set_aside ADD COLUMN republished_at timestamptz;
