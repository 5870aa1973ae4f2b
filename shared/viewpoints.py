"""The viewpoint labels every part speaks: the pose service writes them, fusion's pose component and
exemplar choice compare them, the API and the evaluation read them."""
FRONTAL, LEFT, RIGHT, REAR, ANGLED, UNKNOWN = "frontal", "profile-left", "profile-right", "rear", "angled", "unknown"
