"""`python -m services.pose`: run the pose service (AP-10K keypoints where weights exist, the viewpoint)."""
from services.pose.service import make_handler
from shared.service import main

if __name__ == "__main__":
    main("pose", make_handler)
