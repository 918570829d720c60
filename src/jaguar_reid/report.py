"""`python -m jaguar_reid.report [key=value ...]`: an experiment's report.

The same as `jaguar-reid report` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("report")
