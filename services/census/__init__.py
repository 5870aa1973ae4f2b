"""The census service: re-clusters each property's identity graph over the season (`job.py`), on request
and on its own after enough new decisions or time (`service.py`)."""
