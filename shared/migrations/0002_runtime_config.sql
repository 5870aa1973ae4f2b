-- Settings that change at run time, without restarts: read by the relay, stamped on every event.
CREATE TABLE runtime_config (
    key        text PRIMARY KEY,
    value      jsonb NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    updated_by text NOT NULL DEFAULT 'migration'
);
INSERT INTO runtime_config (key, value) VALUES ('pipeline', '{"mode": "fast"}');

-- Every change is kept: who changed what, when.
CREATE TABLE runtime_config_history (
    id         bigserial PRIMARY KEY,
    key        text NOT NULL,
    value      jsonb NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL
);
