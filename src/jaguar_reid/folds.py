"""`python -m jaguar_reid.folds [key=value ...]`: the folds file.

The same as `jaguar-reid folds` (`--help` lists the keys it reads; see `jaguar_reid.cli`).
"""

from jaguar_reid.cli import run_step

if __name__ == "__main__":
    run_step("folds")
