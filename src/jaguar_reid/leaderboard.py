"""`python -m jaguar_reid.leaderboard [key=value ...]`: every run so far, ranked.

The step itself is `jaguar_reid.reporting.leaderboard`; this module is its command.
"""

from jaguar_reid.io_utils import run_main
from jaguar_reid.reporting.leaderboard import main

if __name__ == "__main__":
    run_main(main)
