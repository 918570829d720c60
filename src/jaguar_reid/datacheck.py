"""`python -m jaguar_reid.datacheck [key=value ...]`: the data report.

The same as `jaguar-reid datacheck` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("datacheck")
