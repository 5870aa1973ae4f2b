"""`python -m services.fusion`: run the fusion service."""
from services.fusion.service import make_handler
from shared.service import main

if __name__ == "__main__":
    main("fusion", make_handler)
