"""`python -m jaguar_reid.scoring [key=value ...]`: out-of-fold scores.

The same as `jaguar-reid scoring` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("scoring")
