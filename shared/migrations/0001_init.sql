-- The source of truth: images, detections and their states, individuals, embeddings.
CREATE EXTENSION IF NOT EXISTS vector;

CREATE TABLE images (
    sha256        text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    byte_size     bigint NOT NULL,
    width         int NOT NULL,
    height        int NOT NULL,
    format        text NOT NULL,
    original_name text NOT NULL,
    site          text NOT NULL,
    camera        text NOT NULL,
    captured_at   timestamptz NOT NULL,
    time_source   text NOT NULL,
    uploaded_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE individuals (
    id           bigserial PRIMARY KEY,
    site         text NOT NULL,
    sex          text NOT NULL CHECK (sex IN ('male', 'female', 'unknown')),
    first_seen   timestamptz NOT NULL,
    last_seen    timestamptz NOT NULL,
    sightings    int NOT NULL DEFAULT 0,
    -- the detection that founded it: founding twice from one detection is impossible
    founded_by   uuid UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX individuals_site ON individuals (site);

CREATE TABLE detections (
    id                  uuid PRIMARY KEY,
    image_sha256        text NOT NULL REFERENCES images (sha256),
    ordinal             int NOT NULL,
    box                 int[] NOT NULL CHECK (cardinality(box) = 4),
    cls                 text NOT NULL CHECK (cls IN ('buck', 'mature', 'mid', 'young', 'doe', 'fawn', 'unknown')),
    detector_confidence real,
    site                text NOT NULL,
    camera              text NOT NULL,
    captured_at         timestamptz NOT NULL,
    crop                bytea NOT NULL,
    state               text NOT NULL DEFAULT 'received'
                        CHECK (state IN ('received', 'extracting', 'fusing', 'assigned', 'new', 'review', 'failed')),
    state_reason        text,
    attempts            int NOT NULL DEFAULT 0,
    individual_id       bigint REFERENCES individuals (id),
    score               real,
    result              jsonb,
    decided_by          text CHECK (decided_by IN ('fusion', 'human')),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    UNIQUE (image_sha256, ordinal)
);
CREATE INDEX detections_pending ON detections (updated_at)
    WHERE state IN ('received', 'extracting', 'fusing');
CREATE INDEX detections_individual ON detections (individual_id);

-- Transactional outbox: a row here means "publish this detection's event".
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    detection_id  uuid NOT NULL REFERENCES detections (id) ON DELETE CASCADE,
    enqueued_at   timestamptz NOT NULL DEFAULT now()
);

-- Every embedding of every detection; `exemplar` rows form the gallery.
CREATE TABLE embeddings (
    id             bigserial PRIMARY KEY,
    detection_id   uuid NOT NULL REFERENCES detections (id),
    version        text NOT NULL,
    model          text NOT NULL,
    dim            int NOT NULL,
    random_weights boolean NOT NULL,
    vec            halfvec NOT NULL,
    site           text NOT NULL,
    individual_id  bigint REFERENCES individuals (id),
    exemplar       boolean NOT NULL DEFAULT false,
    created_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (detection_id, version),
    CHECK (vector_dims(vec) = dim)
);
-- pgvector indexes need a fixed dimension: one partial HNSW index per embedding size in
-- the model registry (halfvec: up to 4,000 dimensions, so ResNet50's 2,048 fit).
CREATE INDEX embeddings_gallery_768 ON embeddings USING hnsw ((vec::halfvec(768)) halfvec_cosine_ops)
    WHERE dim = 768 AND exemplar;
CREATE INDEX embeddings_gallery_1280 ON embeddings USING hnsw ((vec::halfvec(1280)) halfvec_cosine_ops)
    WHERE dim = 1280 AND exemplar;
CREATE INDEX embeddings_gallery_1536 ON embeddings USING hnsw ((vec::halfvec(1536)) halfvec_cosine_ops)
    WHERE dim = 1536 AND exemplar;
CREATE INDEX embeddings_gallery_2048 ON embeddings USING hnsw ((vec::halfvec(2048)) halfvec_cosine_ops)
    WHERE dim = 2048 AND exemplar;
CREATE INDEX embeddings_individual ON embeddings (individual_id) WHERE exemplar;
