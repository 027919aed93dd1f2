-- Outbound events JetStream refused for a reason of their own (a payload over the
-- server's max_payload, a JetStream error reply about the message, a subject no
-- stream captures). The relay moves such a row here, with why, instead of
-- retrying it forever in front of every later event of the hub; what came after
-- it is published as usual. Operators read, fix and republish from here by hand.
CREATE TABLE outbox_set_aside (
    id            bigint PRIMARY KEY,          -- the outbox row's id (its place in the order)
    event_id      uuid NOT NULL,
    subject       text NOT NULL,
    payload       bytea NOT NULL,
    aggregate     text NOT NULL,
    created_at    timestamptz NOT NULL,        -- when the outbox row was written
    reason        text NOT NULL,               -- a short code: max_payload, too_large, ...
    error         text NOT NULL,               -- what NATS or JetStream said
    set_aside_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX idx_outbox_set_aside_set_aside_at ON outbox_set_aside (set_aside_at);
