-- Identity across a whole property, the join of every extractor's output, and the fusion artifact.

-- A property is one population of animals; a site is one camera location inside it. Deer walk from
-- camera to camera, so individuals, the gallery and every statistic belong to the property.
CREATE TABLE properties (
    name       text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    created_at timestamptz NOT NULL DEFAULT now()
);
INSERT INTO properties (name) VALUES ('default');

CREATE TABLE sites (
    name       text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 100),
    property   text NOT NULL REFERENCES properties (name),
    lat        double precision CHECK (lat BETWEEN -90 AND 90),
    lon        double precision CHECK (lon BETWEEN -180 AND 180),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((lat IS NULL) = (lon IS NULL))
);
-- Every site seen so far joins the default property: a single-property user configures nothing.
INSERT INTO sites (name, property)
    SELECT DISTINCT site, 'default' FROM images ON CONFLICT DO NOTHING;

-- Individuals: `site` stays as the site that founded them; the property is what they belong to.
ALTER TABLE individuals ADD COLUMN property text NOT NULL DEFAULT 'default' REFERENCES properties (name);
ALTER TABLE individuals ALTER COLUMN property DROP DEFAULT;
CREATE INDEX individuals_property ON individuals (property);

ALTER TABLE detections
    ADD COLUMN property text NOT NULL DEFAULT 'default' REFERENCES properties (name),
    -- what the pipeline ran for this detection, fixed at its first publication: the mode, the
    -- run-time switches, and the components fusion waits for before it decides
    ADD COLUMN pipeline jsonb,
    ADD COLUMN expected text[],
    -- when the join may decide with what it has (set when the anchoring body features arrive)
    ADD COLUMN join_deadline timestamptz;
ALTER TABLE detections ALTER COLUMN property DROP DEFAULT;
CREATE INDEX detections_join_due ON detections (join_deadline) WHERE state = 'fusing';
CREATE INDEX detections_image ON detections (image_sha256);

ALTER TABLE embeddings ADD COLUMN property text NOT NULL DEFAULT 'default';
ALTER TABLE embeddings ALTER COLUMN property DROP DEFAULT;
-- every embedding stays stored; exemplars are re-chosen among them, so look them up per individual
CREATE INDEX embeddings_by_individual ON embeddings (individual_id, version);

-- The join state: one row per (detection, component) that arrived. A restart or a rebalance
-- mid-join loses nothing (the rows are here) and duplicates nothing (the primary key).
CREATE TABLE detection_features (
    detection_id uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    component    text NOT NULL,
    status       text NOT NULL CHECK (status IN ('ok', 'no-evidence', 'failed')),
    features     jsonb NOT NULL,  -- the component's features (vectors base64), flags, versions, timings
    arrived_at   timestamptz NOT NULL DEFAULT now(),
    late         boolean NOT NULL DEFAULT false,  -- arrived after the decision: stored, never reopens it
    PRIMARY KEY (detection_id, component)
);

-- Every decision, machine or human, in order: "decided once" is a count, and the audit starts here.
CREATE TABLE decisions (
    id            bigserial PRIMARY KEY,
    detection_id  uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    decided_by    text NOT NULL,
    state         text NOT NULL,
    individual_id bigint,
    score         real,
    decided_at    timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX decisions_detection ON decisions (detection_id);

-- The fitted fusion (per-component calibrations, combination weights, thresholds) lives in the
-- database, where every fusion replica reads it; the newest active row applies.
CREATE TABLE calibrations (
    id         bigserial PRIMARY KEY,
    artifact   jsonb NOT NULL,
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    created_by text NOT NULL DEFAULT 'eval'
);

-- The run-time switches gain one per enhancement (no restart: every event is stamped at publish).
UPDATE runtime_config SET value = value || '{"ensemble": true, "temporal": true, "coat": false, "pose": false,
                                             "antler": false}'::jsonb
WHERE key = 'pipeline';
