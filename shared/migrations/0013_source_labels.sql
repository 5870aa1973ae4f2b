-- The uploader's own name for an animal (a Camtrap DP `individualID`, or any label a box came with):
-- kept so that `deer-reid export-labels --source-labels` and eval can use a package's existing
-- identifications; fusion, the census and the gallery never read it.
ALTER TABLE detections ADD COLUMN source_label text CHECK (length(source_label) BETWEEN 1 AND 200);
