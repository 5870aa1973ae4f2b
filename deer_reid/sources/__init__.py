"""Readers of the forms camera-trap people already hold their photos in: MegaDetector batch output
(boxes for a folder of images) and Camtrap DP data packages. Pure parsing and matching; `deer_reid.ingest`
turns what they read into uploads."""
