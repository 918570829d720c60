"""`python -m jaguar_reid.tune [key=value ...]`: post-processing chosen out of fold.

The same as `jaguar-reid tune` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("tune")
