"""`python -m jaguar_reid.folds [key=value ...]`: the identity-grouped (or closed) folds file.

The step itself is `jaguar_reid.data.folds`; this module is its command.
"""

from jaguar_reid.data.folds import main
from jaguar_reid.io_utils import run_main

if __name__ == "__main__":
    run_main(main)
