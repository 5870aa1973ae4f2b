-- Where the relay's event of each detection landed (partition, offset of deer.detections.v1): the
-- reconciler compares it with the body consumer group's committed offset, so a detection queued behind
-- a long backlog is told apart from one whose event was consumed (or lost) without progress.
ALTER TABLE detections ADD COLUMN published_partition integer, ADD COLUMN published_offset bigint;
