-- A dead letter keeps the exact bytes of what arrived. The NATS server forwards
-- subject tokens and headers that are not UTF-8 or hold NUL, which text and
-- jsonb cannot store: `subject` and `headers` then hold a readable form
-- (such bytes written as \xNN) and these columns the bytes as they arrived,
-- the subject as published and the headers as a NATS header block
-- ("NATS/1.0\r\nName: value\r\n...\r\n"). NULL when the readable form is exact.
ALTER TABLE dead_letters
    ADD COLUMN subject_bytes  bytea,
    ADD COLUMN headers_bytes  bytea;
