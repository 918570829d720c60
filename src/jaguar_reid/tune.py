"""`python -m jaguar_reid.tune [key=value ...]`: post-processing chosen out of fold.

The step itself is `jaguar_reid.retrieval.tune`; this module is its command.
"""

from jaguar_reid.io_utils import run_main
from jaguar_reid.retrieval.tune import main

if __name__ == "__main__":
    run_main(main)
