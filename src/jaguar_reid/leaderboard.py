"""`python -m jaguar_reid.leaderboard [key=value ...]`: every run so far, ranked.

The same as `jaguar-reid leaderboard` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("leaderboard")
