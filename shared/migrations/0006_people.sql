-- The people's side: names and notes on individuals, API keys, and the audit log of human changes.

-- People name their deer. A merged individual keeps its row (its id may be in exports and notes)
-- and points at the one it was merged into; it has no sightings left and drops out of lists.
ALTER TABLE individuals
    ADD COLUMN name        text CHECK (length(name) BETWEEN 1 AND 100),
    ADD COLUMN notes       text NOT NULL DEFAULT '' CHECK (length(notes) <= 10000),
    ADD COLUMN tags        text[] NOT NULL DEFAULT '{}' CHECK (cardinality(tags) <= 50),
    ADD COLUMN merged_into bigint REFERENCES individuals (id),
    ADD COLUMN created_by  text NOT NULL DEFAULT 'fusion';
-- one deer per name within a population, whatever the case
CREATE UNIQUE INDEX individuals_name ON individuals (property, lower(name)) WHERE name IS NOT NULL;

-- API keys: only a hash of each is stored. The token is 32 random bytes, so one SHA-256 is enough
-- (a slow password hash protects guessable secrets; these are not guessable).
CREATE TABLE api_keys (
    id           bigserial PRIMARY KEY,
    prefix       text NOT NULL UNIQUE,  -- the token's public part, to find its row
    hash         bytea NOT NULL,
    owner        text NOT NULL CHECK (length(owner) BETWEEN 1 AND 100),
    scope        text NOT NULL CHECK (scope IN ('read', 'review', 'admin')),
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);

-- Every human change: who (the key's owner), when, what it touched before and after, and why.
-- `undo` replays `before` when everything it touched still looks like `after`.
CREATE TABLE audit_log (
    id        bigserial PRIMARY KEY,
    at        timestamptz NOT NULL DEFAULT now(),
    actor     text NOT NULL,
    action    text NOT NULL,
    property  text,
    reason    text NOT NULL DEFAULT '',
    before    jsonb NOT NULL,
    after     jsonb NOT NULL,
    undoes    bigint REFERENCES audit_log (id),
    undone_by bigint REFERENCES audit_log (id)
);
CREATE INDEX audit_log_at ON audit_log (at DESC);

-- Human decisions join the machine's in `decisions`, with the audit entry that made them.
ALTER TABLE decisions ADD COLUMN actor text, ADD COLUMN audit_id bigint REFERENCES audit_log (id);

-- The review queue and the profile pages read detections by individual and by state.
CREATE INDEX detections_review ON detections (created_at) WHERE state = 'review';
