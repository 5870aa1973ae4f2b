-- The antler season archive: one row per detection whose antler features arrived readable. Individuals
-- are reached through the detection (so merges, splits and reassignments carry the archive along);
-- fingerprints are compared only within one season tag.
CREATE TABLE antler_fingerprints (
    detection_id   uuid PRIMARY KEY REFERENCES detections (id) ON DELETE CASCADE,
    season         text NOT NULL CHECK (length(season) BETWEEN 1 AND 40),
    casting_window text CHECK (length(casting_window) BETWEEN 1 AND 40),
    present        boolean NOT NULL,  -- false: the region was readable and held no antlers
    version        text,              -- the fingerprint's version (null without antlers)
    fingerprint    real[] CHECK (fingerprint IS NULL OR cardinality(fingerprint) = 64),
    geometry       jsonb NOT NULL,
    captured_at    timestamptz NOT NULL,
    CHECK (present = (fingerprint IS NOT NULL))
);
CREATE INDEX antler_fingerprints_season ON antler_fingerprints (season);
