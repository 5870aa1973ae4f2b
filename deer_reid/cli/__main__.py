"""`python -m deer_reid.cli`, as `up --detach` and `bench` re-execute the command line."""
import sys

from deer_reid.cli import main

sys.exit(main())
