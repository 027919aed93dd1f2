-- Dead letters remember being replayed (`hub-worker deadletters replay`), so
-- that operators can tell a letter already sent back to the stream from one
-- still waiting for its cause to be fixed.
ALTER TABLE dead_letters
    ADD COLUMN replayed_at   timestamptz,
    ADD COLUMN replay_count  integer NOT NULL DEFAULT 0;
