"""`python -m services.coat`: run the coat feature extractor (colour, markings, pattern)."""
from services.coat.service import make_handler
from shared.service import main

if __name__ == "__main__":
    main("coat", make_handler)
