"""`python -m services.reconciler`: outbox relay, stuck-work reconciler and dead-letter recorder."""
from services.reconciler.service import make_handler
from shared.service import main

if __name__ == "__main__":
    main("reconciler", make_handler)
