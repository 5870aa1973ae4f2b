"""`python -m services.antler`: run the antler feature extractor (geometry, fingerprint, season)."""
from services.antler.service import make_handler
from shared.service import main

if __name__ == "__main__":
    main("antler", make_handler)
