-- What each outbound event is about (a detection, a mapping, a dead letter),
-- so that the relay can publish events of different aggregates concurrently
-- while keeping each aggregate's events in order.
ALTER TABLE outbox ADD COLUMN aggregate text NOT NULL DEFAULT '';
