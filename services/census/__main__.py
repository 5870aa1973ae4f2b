"""`python -m services.census`: the identity graph's re-clustering loop."""
from services.census.service import make_worker
from shared.service import main_loop

if __name__ == "__main__":
    main_loop("census", make_worker)
