"""`python -m jaguar_reid.scoring [key=value ...]`: the out-of-fold scores of an experiment.

The step itself is `jaguar_reid.retrieval.scoring`; this module is its command.
"""

from jaguar_reid.io_utils import run_main
from jaguar_reid.retrieval.scoring import main

if __name__ == "__main__":
    run_main(main)
