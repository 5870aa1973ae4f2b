-- One coat pattern per detection and matcher: XFeat and RootSIFT keypoints are fusion components of their
-- own (RootSIFT: 4 + 128 bytes a keypoint). Rows stored before there were two are XFeat's.
ALTER TABLE coat_patterns ADD COLUMN matcher text NOT NULL DEFAULT 'xfeat';
ALTER TABLE coat_patterns ALTER COLUMN matcher DROP DEFAULT;
ALTER TABLE coat_patterns DROP CONSTRAINT coat_patterns_pkey;
ALTER TABLE coat_patterns ADD PRIMARY KEY (detection_id, matcher);
