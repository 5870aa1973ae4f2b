-- Coat pattern keypoints and descriptors, one row per detection with coat evidence: packed bytes
-- (uint16 positions + int8 descriptors, 68 bytes a keypoint; up to 1,024 XFeat keypoints)
-- instead of base64 in the join's jsonb. Fusion reads them for the shortlisted candidates' exemplars.
CREATE TABLE coat_patterns (
    detection_id uuid PRIMARY KEY REFERENCES detections (id) ON DELETE CASCADE,
    version      text NOT NULL,  -- extractor, its weights checksum, keypoint budget, restriction
    keypoints    int NOT NULL,
    pattern      bytea NOT NULL
);
-- exemplar detections of an individual (the coat of a candidate is read through them)
CREATE INDEX embeddings_exemplar_detections ON embeddings (individual_id, detection_id) WHERE exemplar;
