-- The relay claims outbox rows for a short lease, publishes them with no transaction open, then
-- deletes them: no transaction stays open across broker round trips, and a relay that dies
-- mid-publish loses nothing (its lease runs out and the rows are published again).
ALTER TABLE outbox ADD COLUMN claimed_until timestamptz;
