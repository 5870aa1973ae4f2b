"""`python -m services.body`: run the body feature extractor."""
from services.body.service import make_handler
from shared.service import main

if __name__ == "__main__":
    main("body", make_handler)
