-- How many times fusion re-sent a selective request (pose) that never got an answer before its join
-- deadline: the request leaves after the transaction that expects it commits, so a crash between the two
-- loses it; the deadline re-sends it once instead of deciding without it.
ALTER TABLE detections ADD COLUMN requests_resent smallint NOT NULL DEFAULT 0;
