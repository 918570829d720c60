"""`python -m jaguar_reid.demo_data [key=value ...]`: the synthetic demo data set.

The step itself is `jaguar_reid.data.demo`; this module is its command.
"""

from jaguar_reid.data.demo import main
from jaguar_reid.io_utils import run_main

if __name__ == "__main__":
    run_main(main)
