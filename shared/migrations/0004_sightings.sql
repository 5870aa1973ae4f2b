-- A sighting: the frames of one animal in one burst (same camera, seconds apart, one animal per frame).
-- Its detections are decided together: they are one animal.
ALTER TABLE detections ADD COLUMN sighting uuid;
CREATE INDEX detections_sighting ON detections (sighting) WHERE sighting IS NOT NULL;
CREATE INDEX detections_camera_time ON detections (site, camera, captured_at);
