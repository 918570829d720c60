"""`python -m jaguar_reid.datacheck [key=value ...]`: a look at the data before training.

The step itself is `jaguar_reid.data.datacheck`; this module is its command.
"""

from jaguar_reid.data.datacheck import main
from jaguar_reid.io_utils import run_main

if __name__ == "__main__":
    run_main(main)
